"""Every user mistake and environment fault ends in one line (exit 2, no traceback, nothing written outside the
configured roots); what a run needs is checked before its first expensive step; a killed run leaves nothing
running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _live_in_group(pgid: int) -> list[str]:
    """Processes of a process group that are still running (zombies waiting for init hold nothing)."""
    live = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                live.append(entry.name)
    return live


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_a_sigkilled_encode_leaves_no_process_running(write_run_config, tmp_path):
    config = write_run_config(encoders=["tiny-vit-112"], encode={"batch_size": 4, "num_workers": 2})
    env = {**os.environ, "RECONLAB_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_HOME", None)  # its own temporary Prefect server, as a user's run has
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "encode", "-c", str(config), "--no-progress"], cwd=ROOT, env=env,
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "stores").glob("*/features/c")):
        assert proc.poll() is None, "encode ended before it could be killed"
        time.sleep(0.2)
    assert len(_live_in_group(proc.pid)) >= 3, "expected the server, fork server and workers to be running"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and _live_in_group(proc.pid):
        time.sleep(0.2)
    assert not _live_in_group(proc.pid)
