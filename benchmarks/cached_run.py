"""How fast a fully cached run answers: each CLI command on a config whose work is all done, as a whole (a fresh
process: imports, Prefect's temporary server, the flow) and as stage work alone (the same stage functions called
in one warm process, no Prefect). Run the demo first (`reconlab demo`), then:
    .venv/bin/python benchmarks/cached_run.py [--config configs/demo.yaml]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def stage_work(config: Path) -> dict[str, float]:
    """Seconds of each cached stage's own work, in this (warm) process."""
    from pipeline import plan, plan_table
    from pipeline.config_files import load_run_config
    from pipeline.stages import encode, evaluate, operators, train

    cfg = load_run_config(config)
    times = {}
    start = time.perf_counter()
    plan_table.plan(cfg, config)
    times["plan"] = time.perf_counter() - start
    start = time.perf_counter()
    run = plan.build(cfg, config)
    results = [encode.run(j, progress=False) for j in run.encode.values()]
    times["encode"] = time.perf_counter() - start
    assert all(r.already_complete for r in results), "run the demo first: not everything is cached"
    start = time.perf_counter()
    trained = {name: train.run(job, progress=False) for name, job in run.train.items()}
    times["train"] = time.perf_counter() - start
    start = time.perf_counter()
    for step in run.operators:
        assert operators.run(step.job(cfg, trained[step.encoder].checkpoint)).already_complete
    times["operators"] = time.perf_counter() - start
    start = time.perf_counter()
    targets = run.eval_targets({name: result.checkpoint for name, result in trained.items()})
    evaluate.run(targets, cfg.evaluate, evaluate.load_judges(run.judges, cfg.evaluate.device))
    times["evaluate"] = time.perf_counter() - start
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    args = p.parse_args()
    cli = [sys.executable, "-m", "flows.cli"]
    whole = {
        "--version (imports only)": wall([*cli, "--version"]),
        "plan": wall([*cli, "plan", "-c", str(args.config)]),
    }
    for stage in ("encode", "train", "operators", "evaluate"):
        whole[stage] = wall([*cli, stage, "-c", str(args.config), "--no-progress"])
    whole["run (all four)"] = wall([*cli, "run", "-c", str(args.config), "--no-progress"])
    work = stage_work(args.config)
    print(f"# fully cached {args.config}, fresh process per command, CPU\n")
    print("| command | wall s (fresh process) | stage work s (warm, no Prefect) |\n|---|---|---|")
    for name, seconds in whole.items():
        w = work.get(name)
        print(f"| {name} | {seconds:.1f} | {'-' if w is None else f'{w:.2f}'} |")
    print(f"| (all four stages' work) | | {sum(v for k, v in work.items() if k != 'plan'):.2f} |")


if __name__ == "__main__":
    main()
