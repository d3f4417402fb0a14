"""How the CLI ends on a user's mistake or an environment fault: one line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path

import typer
from typer.core import TyperGroup, TyperOption

from pipeline.config import ConfigError

# Faults of the machine, not of reconlab: shown as the path and the errno's meaning.
ENVIRONMENT_ERRNOS = {
    errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR,
    errno.ENAMETOOLONG, errno.EEXIST, errno.ENOENT, errno.ELOOP, errno.EMFILE, errno.EFBIG,
}  # fmt: skip


def fail(message: str) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message tells the user what to fix: shown without a traceback, exit code 2."""
    from pipeline.models.checkpoints import CheckpointError, DisjointnessError
    from pipeline.models.model_ids import ArchitectureMismatchError
    from pipeline.models.weights import WeightsMismatchError, WeightsNotFoundError
    from pipeline.stop import Interrupted
    from storage import StoreError

    return (
        ConfigError,
        Interrupted,
        WeightsNotFoundError,
        WeightsMismatchError,
        StoreError,
        CheckpointError,
        DisjointnessError,
        ArchitectureMismatchError,
    )


def one_line(error: BaseException) -> str | None:
    """The one-line message for a user error or an environment fault; None for anything else (a bug: traceback)."""
    if isinstance(error, user_errors()):
        return str(error)
    if isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS:
        where = error.filename if error.filename is not None else "(no path given)"
        fix = {errno.ENOSPC: "free space", errno.EDQUOT: "free space", errno.EFBIG: "raise the file size limit "
               "(ulimit -f)"}.get(error.errno)  # fmt: skip
        hint = (
            f"; finished shards, epochs and fits are kept: {fix} and run the same command to resume"
            if fix
            else ""
        )
        return f"{where}: {os.strerror(error.errno)}{hint}"
    if _local_prefect_server_failed(error):
        database = Path(os.environ.get("PREFECT_HOME", "~/.prefect")) / "prefect.db"
        return (
            f"{database}: Prefect's local server failed (HTTP {error.response.status_code}), most often because its "
            "database could not be written; finished shards, epochs and fits are kept: check free space and the file "
            "size limit (ulimit -f) there, then run the same command to resume"
        )
    return None


def _local_prefect_server_failed(error: BaseException) -> bool:
    """A 5xx from the temporary server reconlab runs without PREFECT_API_URL (a configured server's errors are
    that server's, shown as Prefect gives them)."""
    # not imported here: importing prefect sets up its logging (handlers on whatever stream is stderr now)
    prefect_exceptions = sys.modules.get("prefect.exceptions")
    return (
        prefect_exceptions is not None
        and isinstance(error, prefect_exceptions.PrefectHTTPStatusError)
        and error.response.status_code >= 500
        and not os.environ.get("PREFECT_API_URL")
    )


def is_reported(error: BaseException) -> bool:
    return one_line(error) is not None


@contextlib.contextmanager
def reported_in_one_line(stoppable: bool = False):
    """Turn a user error or an environment fault raised inside into `fail(...)`; let anything else through.
    `stoppable` (the commands that run flows): Ctrl-C and SIGTERM stop the running stage at its next safe point,
    and the command ends with one line and exit code 130, whatever Prefect raised on the way out."""
    from flows.interrupts import stopping_on_signals
    from pipeline import stop

    try:
        with stopping_on_signals() if stoppable else contextlib.nullcontext():
            yield
    except BaseException as e:  # Prefect raises its TerminationSignal, a BaseException, on SIGTERM
        if stoppable and stop.requested() and not isinstance(e, typer.Exit):
            typer.secho(str(stop.Interrupted()), fg=typer.colors.RED, err=True)
            raise typer.Exit(130) from None
        if not isinstance(e, Exception):
            raise
        message = one_line(e)
        if message is None:
            raise
        fail(message)


class OneValueEach(TyperGroup):
    """Refuses an option that takes one value given twice (`--config a.yaml --config b.yaml`): Click would keep
    the last one silently."""

    def resolve_command(self, ctx: typer.Context, args: list[str]):
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None and not hasattr(command, "commands"):  # a group resolves its own commands
            args_before_end = rest[: rest.index("--")] if "--" in rest else rest
            for param in command.params:
                if isinstance(param, TyperOption) and not (param.multiple or param.is_flag or param.count):
                    given = [a for a in args_before_end for opt in param.opts
                             if a == opt or (opt.startswith("--") and a.startswith(opt + "="))]  # fmt: skip
                    if len(given) > 1:
                        raise typer.BadParameter(f"given {len(given)} times: give it once", ctx, param)
        return name, command, rest
