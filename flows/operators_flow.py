"""Prefect flow for the operators stage: stores of x and T(x) on the held-out split, the encoder's reconstructor,
then the operator fits. Every step is cached on its own outputs (stores, training runs, operator folders)."""

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
from pipeline.stages import operators  # noqa: E402


@task(name="fit-operators", task_run_name="operators {encoder_name} {tag}")
def fit_operators(job: operators.OperatorJob, encoder_name: str, tag: str) -> operators.OperatorResult:
    return operators.run(job)


@flow(name="reconlab-operators", log_prints=True)
def operators_flow(config_path: str, transform_names: list[str] | None = None, progress: bool = True):
    cfg = load_run_config(config_path)
    ops = cfg.operators
    encoder_names = ops.encoders or [plan.jobs_from_config(cfg, Path(config_path))[0].encoder.name]
    trained = train_flow(config_path, encoder_names, progress)
    pairs = [p for pair in ops.pairs for p in pair.expand()]
    if transform_names:
        pairs = [
            p for p in pairs if p.transform.name in transform_names or p.transform.tag in transform_names
        ]
    results = []
    for encoder_name in encoder_names:
        base = next(
            j
            for j in plan.jobs_from_config(cfg, Path(config_path), [encoder_name])
            if j.transform == TransformSpec()
        )
        identity = encode_store(replace(base, split=ops.split), progress).store_path
        for pair in pairs:
            transformed = encode_store(
                replace(base, split=ops.split, transform=pair.transform), progress
            ).store_path
            checkpoint = trained[encoder_name].checkpoint
            job = operators.OperatorJob(identity, transformed, pair, checkpoint, ops)
            results.append(fit_operators(job, encoder_name, f"{pair.transform.tag}-{pair.direction}"))
    return results
