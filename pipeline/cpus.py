"""The CPUs this process may run on, read before torch loads, and a way back to them.

With OMP_PROC_BIND or GOMP_CPU_AFFINITY set (HPC job scripts often set them), loading torch's OpenMP binds the
thread that imports it to one CPU, and every thread and process that thread starts inherits that one CPU: the
encode stage's decode workers and writer threads all shared it (docs/benchmarks.md; pytorch issues #8126,
#101850). `pipeline/__init__.py` imports this module first, so the CLI and the flows read the CPUs before torch
loads; a script that imports torch first reads them after, and gets no widening.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress

START: frozenset[int] = frozenset(os.sched_getaffinity(0))


def run_on(cpus: frozenset[int], _worker_id: int | None = None) -> None:
    """Let the calling thread run on `cpus` where it is bound to fewer (a DataLoader worker_init_fn, with `cpus`
    the parent's START: a worker forked from a fork server started while bound has that server's CPUs)."""
    if os.sched_getaffinity(0) < cpus:
        with suppress(OSError):  # CPUs taken from this cgroup since: keep the ones we have
            os.sched_setaffinity(0, cpus)


@contextmanager
def start_cpus() -> Iterator[int]:
    """Within: the calling thread, and the threads and processes it starts, run on every CPU in START. Yields
    how many CPUs the thread was bound to before (len(START) when it was not bound)."""
    before = os.sched_getaffinity(0)
    run_on(START)
    try:
        yield len(before)
    finally:
        if os.sched_getaffinity(0) != before:
            os.sched_setaffinity(0, before)
