"""What Prefect costs a run: the demo from nothing through `reconlab run` (Prefect flows, temporary server) against
the same stage functions called in one plain process, then a fully cached `reconlab run`, and start-up alone.
Each measurement in a fresh working folder (its own data/, runs/, .reconlab/); run from the repository root:
    .venv/bin/python benchmarks/orchestration.py [--config configs/demo.yaml]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "flows.cli"]


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, env=_env(cwd))
    return time.perf_counter() - start


def _env(cwd: Path) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PYTHONPATH": str(ROOT), "RECONLAB_HOME": str(cwd / ".reconlab")}


def plain(config: str) -> None:
    """Every stage of the plan, in this process, without Prefect (the baseline)."""
    from pipeline import plan
    from pipeline.config_files import load_run_config

    plan.execute(plan.build(load_run_config(config), Path(config)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    config = str(Path(parser.parse_args().config).resolve())
    rows = {}
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        rows["start-up: --version (imports only)"] = timed([*CLI, "--version"], Path(a))
        rows["demo from nothing, plain stage functions (no Prefect)"] = timed(
            [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
             f"import orchestration; orchestration.plain({config!r})"], Path(b))  # fmt: skip
        rows["demo from nothing, `reconlab run` (Prefect flows)"] = timed(
            [*CLI, "run", "-c", config, "--no-progress"], Path(a)
        )
        rows["fully cached `reconlab run`"] = timed([*CLI, "run", "-c", config, "--no-progress"], Path(a))
        rows["fully cached `reconlab train` (Prefect flow)"] = timed(
            [*CLI, "train", "-c", config, "--no-progress"], Path(a)
        )
        rows["`reconlab plan` (no Prefect)"] = timed([*CLI, "plan", "-c", config], Path(a))
    base = rows["demo from nothing, plain stage functions (no Prefect)"]
    full = rows["demo from nothing, `reconlab run` (Prefect flows)"]
    print(f"# orchestration cost, {Path(config).name}, CPU, fresh folder per measurement\n")
    print("| measurement | wall s |\n|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.1f} |")
    print(
        f"\norchestration overhead of the demo: {full - base:.1f} s = {100 * (full - base) / base:.1f}% of {base:.1f} s"
    )


if __name__ == "__main__":
    main()
