"""Ctrl-C and SIGTERM during a flow command: stop at the stage's next safe point (pipeline/stop.py), say so in
one line, exit 130.

Prefect runs stages on task-runner threads, so Python's KeyboardInterrupt reaches only the main thread, which
waits on them: the stage went on training, and a SIGTERM'd run hung until the stage ended (the main thread ran
its signal handler only once its wait returned). So the signals are read here by a thread of their own, from
Python's wakeup fd: the first asks the stage to stop; once it has (or after GRACE_S, for a stage between safe
points), the process ends. A second Ctrl-C ends it at once; a second SIGTERM does not (Prefect's flow engine
catches the first and sends it to the process again: that ended runs at once, mid-batch). Ending without the
stage's own shutdown is safe: every artifact survives a SIGKILL, and flows/reaper.py ends what the run started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from datetime import UTC

from pipeline import stop

SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE_S = 30.0  # a stage between safe points (e.g. an evaluation pass) gets this long
AFTER_STOP_S = 3.0  # for Prefect to record the failed run (the CLI's own path usually ends the process first)


def _say(message: str, to_the_run: bool = True) -> None:
    if _served_by is not None and os.getppid() != _served_by:
        _output_to_devnull()
    with contextlib.suppress(OSError):  # not print: a flow with log_prints sends prints to its logger
        os.write(2, (message + "\n").encode())
    if _served_by is not None and to_the_run:
        _post_to_run_logs(message)


def _output_to_devnull() -> None:
    """The serving process (or worker) is gone and nothing reads this process's stdout and stderr: a write there
    raised (EPIPE), and Prefect's console handler then ended the task with SystemExit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)


def _post_to_run_logs(message: str) -> None:
    """The reason a served run stops, in its logs on the server at once and by a client of its own: after a
    SIGTERM, Prefect's engine records the run and ends the process before its log worker sends what it queued,
    and this thread has no run context for Prefect's log handler."""
    from datetime import datetime

    from prefect.client.orchestration import get_client

    log = {"name": "reconlab.stop", "level": logging.WARNING, "message": message,
           "timestamp": datetime.now(UTC).isoformat(), "flow_run_id": os.environ["PREFECT__FLOW_RUN_ID"]}  # fmt: skip
    with (
        contextlib.suppress(Exception),
        get_client(sync_client=True) as client,
    ):  # best effort: the stop goes on
        client.create_logs([log])


def _exit_now(message: str) -> None:
    _say(message, to_the_run=False)  # at once: not after a request to a server that may not answer
    os._exit(130)


def _end_after_stop() -> None:
    if stop.wait_stopped(GRACE_S):
        time.sleep(AFTER_STOP_S)
    _exit_now(str(stop.Interrupted()))


def _on_signal(signum: int) -> None:
    if stop.requested():
        if signum == signal.SIGTERM:  # Prefect's engine sends a SIGTERM it caught to this process again
            return
        _exit_now("stopped now: " + str(stop.Interrupted()).removeprefix("interrupted: "))
    stop.request()
    # a served run has no terminal to press Ctrl-C in
    again = "press Ctrl-C again to stop now. Finished" if _served_by is None else "finished"
    _say(f"{signal.Signals(signum).name}: stopping at the next safe point (a training step, an encode batch); "
         f"{again} work is kept either way.")  # fmt: skip
    if signum == signal.SIGTERM and _served_by is not None:
        return  # Prefect's engine ends the process once it has recorded the run: an exit of ours raced it
    threading.Thread(target=_end_after_stop, daemon=True).start()


def _read_signals(reader: socket.socket, signals: tuple[int, ...]) -> None:
    while data := reader.recv(64):
        for signum in data:
            if signum in signals:
                _on_signal(signum)


@contextlib.contextmanager
def stopping_on_signals(signals: tuple[int, ...] = SIGNALS, also_seen: tuple[int, ...] = ()):
    """While inside: SIGINT and SIGTERM ask the running stage to stop (main thread only; elsewhere a no-op).
    `also_seen`: signals whose handler stays someone else's, acted on too whenever that handler catches them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    # Python writes every signal a Python handler catches to this fd, whoever's handler it is.
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    # The handlers only keep the default actions away (KeyboardInterrupt, termination); the thread acts.
    previous = {s: signal.signal(s, lambda signum, frame: None) for s in signals}
    global _open
    _open += 1
    threading.Thread(
        target=_read_signals, args=(reader, signals + also_seen), daemon=True, name="reconlab-signals"
    ).start()
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(previous_fd)
        writer.close()  # the reading thread sees the end and returns
        _open -= 1


_open = 0  # stopping_on_signals contexts open in this process (the CLI's, a served run's)


def in_a_served_run() -> None:
    """In a flow run process that Prefect's runner (`reconlab serve`) or a worker started: a Ctrl-C (the terminal's
    SIGINT reaches the serving process's whole group) stops the stage as in a CLI command, so the run ends Failed
    on the server; before, the process died at once and the run stayed Running. SIGTERM stays Prefect's (its
    runner sends it to cancel a run from the UI; its flow engine records the run Crashed), but the stage stops at
    its next safe point on it too: Prefect's engine waits for the running task before it records anything, and the
    stage went on to its end (a SIGKILL a few seconds later, from the reaper of a killed `reconlab serve` or from
    `docker stop`, then left the run Running for good). For the rest of the process (it runs this one flow)."""
    if (
        _open
        or not os.environ.get("PREFECT__FLOW_RUN_ID")
        or signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    ):
        return
    if threading.current_thread() is threading.main_thread():
        global _served_by
        _served_by = os.getppid()
        # kept: a collected context would close itself
        _kept.append(stopping_on_signals((signal.SIGINT,), also_seen=(signal.SIGTERM,)))
        _kept[-1].__enter__()


_kept: list = []
_served_by: int | None = None  # in a served run: the serving process or worker that started it


@contextlib.contextmanager
def flow_runs_stop_before_serving_ends():
    """`reconlab serve`: Prefect's runner kills the flow runs it started as it shuts down, so after a Ctrl-C they
    stayed Running on the server, and with each deployment's limit of one run the next runs waited behind them.
    Yields `stop_serving(signum)`, the SIGINT handler here and what the runner's SIGTERM handler must call: the
    running flow runs stop at their next safe point and record it (in_a_served_run; a Ctrl-C reaches them from the
    terminal, a SIGTERM to this process alone, as from `kill`, `docker stop` or systemd, is passed on to them as
    SIGINT), serving ends once they have (up to GRACE_S); a second signal ends it at once."""
    stopping = threading.Event()

    def stop_serving(signum: int) -> None:
        if stopping.is_set():
            raise KeyboardInterrupt  # a KeyboardInterrupt ends Prefect's serve
        stopping.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        runs = _flow_run_children()
        if signum != signal.SIGINT:
            for pid in runs:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGINT)
        name = signal.Signals(signum).name
        _say(
            f"{name}: the running flow runs stop at their next safe point first; send it again to stop now."
            if runs
            else f"{name}: no flow run is running; serving ends."
        )
        threading.Thread(target=_interrupt_when_runs_ended, daemon=True).start()

    if threading.current_thread() is not threading.main_thread():
        yield stop_serving
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stop_serving(signum))
    try:
        yield stop_serving
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt_when_runs_ended() -> None:
    deadline = time.monotonic() + GRACE_S + AFTER_STOP_S
    while time.monotonic() < deadline and _flow_run_children():
        time.sleep(0.2)
    signal.pthread_kill(
        threading.main_thread().ident, signal.SIGINT
    )  # a KeyboardInterrupt ends Prefect's serve


def _flow_run_children() -> list[int]:
    """This process's children that run a flow (Prefect's runner gives each PREFECT__FLOW_RUN_ID); Linux only."""
    from flows.reaper import processes, runs_a_flow

    return [pid for pid, (parent, _) in processes().items() if parent == os.getpid() and runs_a_flow(pid)]
