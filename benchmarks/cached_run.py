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
    from pipeline import plan
    from pipeline.config_files import load_run_config
    from pipeline.stages import encode, evaluate, operators, train

    cfg = load_run_config(config)
    times = {}
    start = time.perf_counter()
    plan.plan(cfg, config)
    times["plan"] = time.perf_counter() - start
    start = time.perf_counter()
    results = {
        (j.encoder.name, j.split, j.transform.tag): encode.run(j, progress=False)
        for j in plan.encode_jobs(cfg, config)
    }
    times["encode"] = time.perf_counter() - start
    assert all(r.already_complete for r in results.values()), "run the demo first: not everything is cached"
    start = time.perf_counter()
    trained = {}
    for name in dict.fromkeys(k[0] for k in results):
        job = train.TrainJob(results[(name, cfg.train.train_split, "identity")].store_path,
                             results[(name, cfg.train.val_split, "identity")].store_path, cfg.train)  # fmt: skip
        trained[name] = train.run(job, progress=False)
    times["train"] = time.perf_counter() - start
    start = time.perf_counter()
    name = plan.operator_encoders(cfg, plan.jobs_from_config(cfg, config))[0]
    for pair in (p for spec in cfg.operators.pairs for p in spec.expand()):
        job = operators.OperatorJob(results[(name, cfg.operators.split, "identity")].store_path,
                                    results[(name, cfg.operators.split, pair.transform.tag)].store_path, pair,
                                    trained[name].checkpoint, cfg.operators)  # fmt: skip
        assert operators.run(job).already_complete
    times["operators"] = time.perf_counter() - start
    start = time.perf_counter()
    targets = [evaluate.EvalTarget(n, results[(n, cfg.evaluate.split, "identity")].store_path, trained[n].checkpoint)
               for n in trained]  # fmt: skip
    evaluate.run(targets, cfg.evaluate, config)
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
