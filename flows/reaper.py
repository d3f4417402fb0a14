"""Nothing of a killed CLI run keeps running. A SIGKILLed process cannot clean up, and what it started (Prefect's
temporary server, the DataLoader fork server and its workers, multiprocessing's resource tracker) is re-parented
and lives on for minutes, holding memory and ports. `start(pid)` launches this module as a small watcher in its
own session: it notes the run's descendants every half second and, once the run is gone, ends them (SIGTERM,
then SIGKILL; a flow run of a killed `reconlab serve` gets the time to stop and record it first). Linux only
(/proc); elsewhere it does nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.5
GRACE_S = 3.0
# A flow run left by a killed `reconlab serve` stops at its stage's next safe point and records its state on the
# server; killed before that, it stays Running there for good. flows/interrupts.py gives a stage 30 s + 3 s.
FLOW_RUN_GRACE_S = 40.0


_watching: set[int] = set()


def start(pid: int | None = None) -> None:
    """Watch `pid` (default: this process); once per process."""
    pid = pid or os.getpid()
    if pid in _watching or not sys.platform.startswith("linux") or os.environ.get("RECONLAB_NO_REAPER"):
        return
    _watching.add(pid)
    subprocess.Popen(
        [sys.executable, "-m", "flows.reaper", str(pid)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) for every process we can see."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended while we looked
        table[int(entry.name)] = (int(fields[1]), fields[19])  # ppid, starttime (fields 4 and 22 of stat)
    return table


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True  # gone


def _descendants(root: int, table: dict[int, tuple[int, str]]) -> dict[int, str]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = table[pid][1]
        todo += children.get(pid, [])
    return found


def environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # ended meanwhile, or not ours to read
        return b""


def runs_a_flow(pid: int) -> bool:
    """Prefect's runner and workers give each flow-run process its PREFECT__FLOW_RUN_ID."""
    return b"PREFECT__FLOW_RUN_ID=" in environ(pid)


def _signal_all(known: dict[int, str], sig: int) -> dict[int, str]:
    """Send `sig` to each known process still running (same start time: not a recycled pid); return those."""
    table = processes()
    alive = {pid: start for pid, start in known.items() if table.get(pid, (0, None))[1] == start}
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return alive


def main(watched: int) -> None:
    me = os.getpid()
    table = processes()
    if watched not in table:
        return
    started = table[watched][1]
    known: dict[int, str] = {}
    # A zombie has ended: its parent may reap it only later (e.g. once the pipes it holds are read to their end,
    # which the processes it left may hold open).
    while table.get(watched, (0, None))[1] == started and not _is_zombie(watched):
        known = {pid: s for pid, s in _descendants(watched, table).items() if pid != me}
        time.sleep(POLL_S)
        table = processes()
    # The run is gone: whatever it left must go too, including what its children started meanwhile. Flow runs
    # first, alone: each stops its own stage and workers and records how it ended.
    known |= {pid: s for root in list(known) for pid, s in _descendants(root, table).items()}
    # the flow-run process, not the fork server or resource tracker it started (they inherit its environment)
    flow_runs = {
        pid: s for pid, s in known.items() if runs_a_flow(pid) and not runs_a_flow(table.get(pid, (0, ""))[0])
    }
    if _signal_all(flow_runs, signal.SIGTERM):
        _wait_ended(flow_runs, FLOW_RUN_GRACE_S)
    if _signal_all(known, signal.SIGTERM):
        _wait_ended(known, GRACE_S)
        _signal_all(known, signal.SIGKILL)


def _wait_ended(known: dict[int, str], timeout_s: float) -> None:
    """Until every known process has ended (a zombie has: where nothing reaps it, it would count for ever)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and any(not _is_zombie(pid) for pid in _signal_all(known, 0)):
        time.sleep(0.1)


if __name__ == "__main__":
    main(int(sys.argv[1]))
