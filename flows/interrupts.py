"""Ctrl-C and SIGTERM during a flow command: stop at the stage's next safe point (pipeline/stop.py), say so in
one line, exit 130.

Prefect runs stages on task-runner threads, so Python's KeyboardInterrupt reaches only the main thread, which
waits on them: the stage went on training, and a SIGTERM'd run hung until the stage ended (the main thread ran
its signal handler only once its wait returned). So the signals are read here by a thread of their own, from
Python's wakeup fd: the first asks the stage to stop; once it has (or after GRACE_S, for a stage between safe
points), the process ends. A second signal ends it at once. Ending without the stage's own shutdown is safe:
every artifact survives a SIGKILL, and flows/reaper.py ends what the run started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time

from pipeline import stop

SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE_S = 30.0  # a stage between safe points (e.g. an evaluation pass) gets this long
AFTER_STOP_S = 3.0  # for Prefect to record the failed run (the CLI's own path usually ends the process first)


def _say(message: str) -> None:
    os.write(2, (message + "\n").encode())  # not print: a flow with log_prints sends prints to its logger


def _exit_now(message: str) -> None:
    _say(message)
    os._exit(130)


def _end_after_stop() -> None:
    if stop.wait_stopped(GRACE_S):
        time.sleep(AFTER_STOP_S)
    _exit_now(str(stop.Interrupted()))


def _on_signal(signum: int) -> None:
    if stop.requested():
        _exit_now("stopped now: " + str(stop.Interrupted()).removeprefix("interrupted: "))
    stop.request()
    _say(f"{signal.Signals(signum).name}: stopping at the next safe point (a training step, an encode batch); "
         "press Ctrl-C again to stop now. Finished work is kept either way.")  # fmt: skip
    threading.Thread(target=_end_after_stop, daemon=True).start()


def _read_signals(reader: socket.socket) -> None:
    while data := reader.recv(64):
        for signum in data:
            if signum in SIGNALS:
                _on_signal(signum)


@contextlib.contextmanager
def stopping_on_signals():
    """While inside: SIGINT and SIGTERM ask the running stage to stop (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    # The handlers only keep the default actions away (KeyboardInterrupt, termination); the thread acts.
    previous = {s: signal.signal(s, lambda signum, frame: None) for s in SIGNALS}
    threading.Thread(target=_read_signals, args=(reader,), daemon=True, name="reconlab-signals").start()
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(previous_fd)
        writer.close()  # the reading thread sees the end and returns
