"""Worker processes (the encode stage's DataLoader decoders, the train stage's loader): forked from a clean fork
server, never from the stage's process, and never importing the program that started the stage."""

from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import signal
import sys
import threading
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from pipeline import cpus

# the modules with the workers' code; the fork server imports them once, whichever stage starts it
WORKER_MODULES = ["pipeline.data.decode_workers", "pipeline.data.feature_loader"]


def context():
    """Workers are not forks of this (possibly multi-threaded) process: forked from inside a Prefect
    flow (its threads, event loop and exit hooks) they died with exit code 1. They fork from a clean fork server
    that has already imported WORKER_MODULES, so a worker starts in milliseconds."""
    server = multiprocessing.get_context("forkserver")
    server.set_forkserver_preload(WORKER_MODULES)
    _start_fork_server()
    return server


def _start_fork_server() -> None:
    """The fork server imports the workers' modules from where this process did. CPython (up to 3.13) starts it
    with `-c`, which puts the working directory first on its sys.path (the sys.path it is handed is not used), so a
    folder named `pipeline` where the command ran (an older checkout, a data folder) was imported instead, and
    every worker died ("No module named 'pipeline.data.decode_workers'"). It starts with PYTHONSAFEPATH (no
    working directory) and the folder holding this `pipeline` first on PYTHONPATH."""
    # the environment is the process's, other threads' subprocesses see it: changed only to start the server
    if getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None) is not None:
        return
    with _environ_swap:
        saved = {name: os.environ.get(name) for name in ("PYTHONSAFEPATH", "PYTHONPATH")}
        os.environ["PYTHONSAFEPATH"] = "1"
        os.environ["PYTHONPATH"] = os.pathsep.join([_HOME, *filter(None, [saved["PYTHONPATH"]])])
        # SIGINT blocked while it starts (the mask survives fork and exec): a terminal's Ctrl-C reaches the whole
        # process group, and the server ignores it only once its imports (torch: seconds) are done; before, it
        # died with a traceback, and the stage waited on it. Pending, then ignored, the signal is dropped.
        # The resource tracker first: starting it unblocks SIGINT (multiprocessing's own mask dance).
        multiprocessing.resource_tracker.ensure_running()
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


_HOME = str(Path(__file__).resolve().parents[2])  # the folder that holds the `pipeline` package
_environ_swap = threading.Lock()


def init():
    """A DataLoader's worker_init_fn (a worker process of our own calls it with 0): the terminal's Ctrl-C reaches
    the whole process group, and the stage stops its workers itself (pipeline/stop.py); each worker runs on every
    CPU the process started with, and ends with the process that started it."""
    return functools.partial(_start, cpus.START, os.getpid())


def _start(start_cpus: frozenset[int], stage_pid: int, worker_id: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cpus.run_on(start_cpus, worker_id)
    threading.Thread(target=_end_with, args=(stage_pid,), daemon=True, name="end-with-stage").start()


def _end_with(stage_pid: int) -> None:
    """A worker's parent is the fork server, and the fork server lives as long as any worker holds its pipe: a
    stage's process killed where no reaper ran (SIGKILL of a script, a test) left both for good, the worker
    waiting on its queue. The worker now ends within a second of the stage's process."""
    while True:
        time.sleep(1.0)
        try:
            os.kill(stage_pid, 0)
        except ProcessLookupError:
            os._exit(0)
        except PermissionError:  # the pid is another user's process now: the stage's is gone
            os._exit(0)


def started(loader: torch.utils.data.DataLoader) -> Iterator:
    """The loader's batches, its workers started.

    A worker started by a fork server or by spawn first imports the parent's `__main__` (CPython runs it again
    as `__mp_main__`), and the parent waits for each one in turn whenever the pickled dataset is larger than a
    pipe's buffer (64 KiB, about a thousand image records). Under a served Prefect run `__main__` is
    `prefect.engine` (1.3 s to import here) and a benchmark script imports more: on an H200 machine 12 decode
    workers took 7.6 s to start, 0.6 s each, and each kept a copy of those modules. The workers need nothing from
    `__main__` (their code is in the module the fork server preloads), so it is hidden from them while they
    start. CPython's own way, preloading `__main__` in the fork server, does not work up to 3.13 (its fork server
    looks for a `main_path` key that the preparation data names `init_main_from_path`)."""
    if not loader.num_workers:
        return iter(loader)
    with main_hidden():
        return iter(loader)


@contextmanager
def main_hidden() -> Iterator[None]:
    """Within: processes started from `context()` do not import this program's `__main__` (see `started`)."""
    # two stages starting their workers at once on two threads must not swap in each other's stub
    with _main_swap:
        main = sys.modules["__main__"]
        # no __file__ or __spec__: nothing for the workers to import
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            yield
        finally:
            sys.modules["__main__"] = main


_main_swap = threading.Lock()
