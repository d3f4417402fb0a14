"""A stop asked for by a signal (Ctrl-C, SIGTERM), honoured by the long stages at their next safe point: a
training step, an encode batch. What stopping there leaves is what any kill leaves (every artifact survives a
SIGKILL: finished shards, epochs and fits are kept, a rerun resumes), only without a traceback and without
waiting for the stage to end. The CLI turns signals into requests (flows/interrupts.py); stage logic only checks.
"""

from __future__ import annotations

import os
import threading

_requested = threading.Event()
_stopped = threading.Event()


class Interrupted(Exception):
    def __init__(self):
        # a flow run that Prefect's runner or a worker started has no command to repeat
        again = "trigger the run again" if os.environ.get("PREFECT__FLOW_RUN_ID") else "run the same command"
        super().__init__(f"interrupted: finished shards, epochs and fits are kept; {again} to resume")


def request() -> None:
    _requested.set()


def requested() -> bool:
    return _requested.is_set()


def check() -> None:
    """At a safe point of a stage: raise Interrupted if a stop was asked for."""
    if _requested.is_set():
        _stopped.set()
        raise Interrupted()


def wait_stopped(timeout_s: float) -> bool:
    """Wait until a stage stopped at a safe point (True), or `timeout_s` passed (False)."""
    return _stopped.wait(timeout_s)
