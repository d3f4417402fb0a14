"""Progress bars and notices: tqdm's bars on a terminal; where no terminal watches (a flow run that `reconlab
serve` or a worker started, whose logs go to the Prefect server), the same bar as one log line on the
`reconlab.progress` logger every RECONLAB_PROGRESS_LOG_S seconds, and once at the end. Notices (a wait, a repair,
a fallback) go to stderr, or to the `reconlab.notice` logger in such a flow run."""

from __future__ import annotations

import contextlib
import logging
import os

from tqdm.auto import tqdm

LOGGER = logging.getLogger("reconlab.progress")
NOTICES = logging.getLogger("reconlab.notice")


def notice(message: str) -> None:
    """A line a user watching the run must see. Not print: a flow's log_prints turns prints into log records,
    which the CLI's Prefect logging level (WARNING) hides."""
    if os.environ.get("PREFECT__FLOW_RUN_ID"):  # a served run (flows/prefect_env.served_run_logging)
        NOTICES.info(message)
        return
    with contextlib.suppress(OSError):
        os.write(2, (message + "\n").encode())


class _LogLines:
    """tqdm's output stream: each refresh of the bar, one log record."""

    def write(self, text: str) -> None:
        if text := text.strip("\r\n "):
            LOGGER.info(text)

    def flush(self) -> None:
        pass


def bar(**kwargs) -> tqdm:
    """A tqdm bar (its keyword arguments); a log line every RECONLAB_PROGRESS_LOG_S seconds when that is set."""
    every_s = os.environ.get("RECONLAB_PROGRESS_LOG_S")
    if every_s and not kwargs.get("disable"):
        # no ncols: a stream without a terminal gets a 10-character meter and every statistic in full
        return tqdm(file=_LogLines(), mininterval=float(every_s), maxinterval=float(every_s), ascii=True,
                    **{k: v for k, v in kwargs.items() if k not in ("file", "mininterval")})  # fmt: skip
    return tqdm(**kwargs)
