"""Run Prefect with no server, no network and nothing written to the user's home.

Must run before the first `import prefect`: Prefect reads these settings at import time.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # cold start (SQLite migrations) takes 13-16 s here
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",  # telemetry would try DNS and log errors offline
    "PREFECT_SERVER_LOGGING_LEVEL": "CRITICAL",
}
# Without a server the CLI's own output is the record: Prefect stays quiet. With one, stage progress, what was
# cached and where artifacts went are logged at INFO and sent to it (`prefect flow-run logs`, the UI).
LOCAL = {"PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_LOGGING_TO_API_ENABLED": "false"}
SERVED = {"PREFECT_LOGGING_LEVEL": "INFO", "PREFECT_LOGGING_TO_API_ENABLED": "true"}


def configure(home: str | Path | None = None) -> Path:
    """Point PREFECT_HOME at `home` (default: $RECONLAB_HOME/prefect, RECONLAB_HOME defaulting to ./.reconlab)."""
    if "PREFECT_HOME" not in os.environ:
        base = Path(os.environ.get("RECONLAB_HOME", ".reconlab"))
        os.environ["PREFECT_HOME"] = str((Path(home) if home else base / "prefect").resolve())
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    for key, value in (SERVED if os.environ.get("PREFECT_API_URL") else LOCAL).items():
        os.environ.setdefault(key, value)
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    return Path(os.environ["PREFECT_HOME"])


class _UserErrorFilter(logging.Filter):
    """Drops Prefect's failure records (traceback and 'Finished in state Failed') for errors that the CLI reports
    itself in one line (flows.errors.one_line); every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        from flows.errors import is_reported, user_errors

        if record.levelno < logging.ERROR:
            return True
        from pipeline import stop

        if stop.requested():  # the CLI says in one line that it stopped (flows/interrupts.py)
            return False
        if record.exc_info and record.exc_info[1] is not None:
            return not is_reported(record.exc_info[1])
        # Records without exc_info name the exception in their text: "... exception ConfigError: ...".
        names, todo = {"PermissionError", "OSError"}, list(user_errors())
        while todo:  # subclasses too (StoreLocked is a StoreError)
            cls = todo.pop()
            names.add(cls.__name__)
            todo += cls.__subclasses__()
        return not any(f"exception {name}:" in record.getMessage() for name in names)


def quiet_user_errors() -> None:
    """Let the CLI's one-line message be the only report of a user error raised inside a flow."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _UserErrorFilter) for f in logger.filters):
            logger.addFilter(_UserErrorFilter())


class _OneLineInServedRuns(logging.Filter):
    """In a flow run that a runner or worker started, no terminal shows the CLI's one line: the run's own records
    are its report. Records of a user error or a stop keep their one-line text without the traceback, and the
    engine's closing repeat of the same exception (under the run's random name) is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        from flows.errors import is_reported

        error = record.exc_info[1] if record.exc_info else None
        if error is None or not is_reported(error):
            return True
        message = record.getMessage()
        if message.startswith("Engine execution exited with unexpected exception"):
            return False
        # Prefect names the error by its repr: a multi-line message would show as one line of literal "\n"
        text, name = str(error), type(error).__name__
        named = (
            text[:1].upper() + text[1:] if text.lower().startswith(f"{name.lower()}:") else f"{name}: {text}"
        )
        record.msg, record.args = message.replace(repr(error), named), ()
        record.exc_info, record.exc_text = None, None
        return True


def served_run_logging() -> None:
    """In a flow run process started by `reconlab serve` or a worker (PREFECT__FLOW_RUN_ID set): user errors in
    one line; reconlab's own records (`reconlab.*`: progress, epochs) at INFO, to the console through the root
    logger and to the run's logs through the handlers Prefect gives its `prefect.extra` logger (what
    PREFECT_LOGGING_EXTRA_LOGGERS does, without depending on the worker's environment); progress bars as a log
    line every 30 s (RECONLAB_PROGRESS_LOG_S)."""
    if not os.environ.get("PREFECT__FLOW_RUN_ID"):
        return
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OneLineInServedRuns) for f in logger.filters):
            logger.addFilter(_OneLineInServedRuns())
    ours = logging.getLogger("reconlab")
    ours.setLevel(logging.INFO)
    for handler in logging.getLogger("prefect.extra").handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    os.environ.setdefault("RECONLAB_PROGRESS_LOG_S", "30")


class _SubprocessInOwnSession:
    """The `subprocess` module as Prefect's server module sees it: every Popen starts a session of its own."""

    def __getattr__(self, name: str):
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args, **kwargs):  # noqa: N802 (subprocess's name)
        return subprocess.Popen(*args, **{**kwargs, "start_new_session": True})


def temporary_server_in_own_session() -> None:
    """Without PREFECT_API_URL, Prefect starts a temporary server as a child in the CLI's process group, so the
    terminal's Ctrl-C stops it too, before the run can record that it stopped: its flow run stayed RUNNING. In a
    session of its own it outlives the Ctrl-C; Prefect's exit handler stops it, flows/reaper.py after a SIGKILL."""
    if os.environ.get("PREFECT_API_URL"):
        return
    from prefect.server.api import server

    server.subprocess = _SubprocessInOwnSession()


def server_answers(api_url: str, timeout_s: float = 10.0) -> bool:
    """Whether anything answers HTTP at `api_url`/health (an error status counts: a server that wants a key)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout_s):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):  # refused, unknown host, timeout, not a URL
        return False
