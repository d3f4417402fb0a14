"""Prefect flow for the evaluate stage: held-out stores and reconstructors of every encoder (cached), then scores,
statistics and the report."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from flows import prefect_env

prefect_env.configure()

from prefect import flow, task  # noqa: E402

from flows.encode_flow import encode_store  # noqa: E402
from flows.train_flow import train_flow  # noqa: E402
from pipeline import plan  # noqa: E402
from pipeline.config import TransformSpec  # noqa: E402
from pipeline.config_files import load_run_config  # noqa: E402
from pipeline.stages import evaluate  # noqa: E402


@task(name="evaluate")
def evaluate_task(targets: list[evaluate.EvalTarget], config_path: str) -> evaluate.EvaluateResult:
    cfg = load_run_config(config_path)
    return evaluate.run(targets, cfg.evaluate, Path(config_path))


@flow(name="reconlab-evaluate", log_prints=True)
def evaluate_flow(config_path: str, progress: bool = True) -> evaluate.EvaluateResult:
    cfg = load_run_config(config_path)
    jobs = [
        j
        for j in plan.jobs_from_config(cfg, Path(config_path), cfg.evaluate.encoders)
        if j.transform == TransformSpec()
    ]
    names = list(dict.fromkeys(j.encoder.name for j in jobs))
    trained = train_flow(config_path, names, progress)
    targets = []
    for name in names:
        base = next(j for j in jobs if j.encoder.name == name)
        store = encode_store(replace(base, split=cfg.evaluate.split), progress).store_path
        targets.append(evaluate.EvalTarget(name, store, trained[name].checkpoint))
    return evaluate_task(targets, config_path)
