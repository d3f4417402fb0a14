"""How the CLI ends on a user's mistake: one line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import typer

from pipeline.config import ConfigError


def fail(message: str) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message tells the user what to fix: shown without a traceback, exit code 2."""
    from pipeline.models.checkpoints import CheckpointError, DisjointnessError
    from pipeline.models.encoders import ArchitectureMismatchError
    from pipeline.models.weights import WeightsNotFoundError
    from storage import StoreError

    return (
        ConfigError,
        WeightsNotFoundError,
        StoreError,
        CheckpointError,
        DisjointnessError,
        ArchitectureMismatchError,
    )
