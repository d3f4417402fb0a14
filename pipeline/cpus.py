"""The CPUs this process may run on, read before torch loads, and a way back to them.

With OMP_PROC_BIND or GOMP_CPU_AFFINITY set (HPC job scripts often set them), loading torch's OpenMP binds the
thread that imports it to one CPU, and every thread and process that thread starts inherits that one CPU: the
encode stage's decode workers and writer threads all shared it (docs/benchmarks.md; pytorch issues #8126,
#101850). `pipeline/__init__.py` imports this module first, so the CLI and the flows read the CPUs before torch
loads. Where torch loaded first with such a variable set (a notebook, a script), START is every CPU the cgroup
allows instead: a `taskset` narrower than that is then not honoured.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

_LINUX = hasattr(os, "sched_getaffinity")  # affinity calls are Linux's; elsewhere this module does nothing


def _cpus_now() -> frozenset[int]:
    return frozenset(os.sched_getaffinity(0) if _LINUX else range(os.cpu_count() or 1))


def _cpus_the_cgroup_allows() -> frozenset[int]:
    """Asked on a thread of its own, which asks for every CPU: the kernel gives the ones this cgroup allows."""
    found = []

    def ask() -> None:
        with suppress(OSError):
            os.sched_setaffinity(0, range(os.cpu_count() or 1))
            found.append(frozenset(os.sched_getaffinity(0)))

    thread = threading.Thread(target=ask)
    thread.start()
    thread.join()
    return found[0] if found else _cpus_now()


_OPENMP_BINDS = any(
    os.environ.get(name, "").lower() not in ("", "false")
    for name in ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY")
)
START: frozenset[int] = (
    _cpus_the_cgroup_allows() if _LINUX and _OPENMP_BINDS and "torch" in sys.modules else _cpus_now()
)


def run_on(cpus: frozenset[int], _worker_id: int | None = None) -> None:
    """Let the calling thread run on `cpus` where it is bound to fewer (a DataLoader worker_init_fn, with `cpus`
    the parent's START: a worker forked from a fork server started while bound has that server's CPUs)."""
    if _LINUX and _cpus_now() < cpus:
        with suppress(OSError):  # CPUs taken from this cgroup since: keep the ones we have
            os.sched_setaffinity(0, cpus)


@contextmanager
def start_cpus() -> Iterator[int]:
    """Within: the calling thread, and the threads and processes it starts, run on every CPU in START. Yields
    how many CPUs the thread was bound to before (len(START) when it was not bound)."""
    before = _cpus_now()
    run_on(START)
    try:
        yield len(before)
    finally:
        if _cpus_now() != before:
            os.sched_setaffinity(0, before)
