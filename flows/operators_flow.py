"""Prefect flow for the operators stage: the plan's stores of x and T(x) on the held-out split, the encoder's
reconstructor, then the operator fits. Every step is cached on its own outputs (stores, runs, operator folders)."""

from __future__ import annotations

from pathlib import Path

from flows import prefect_env

prefect_env.configure()

from prefect import flow, task  # noqa: E402

from flows.encode_flow import encode_store  # noqa: E402
from flows.train_flow import train_flow  # noqa: E402
from pipeline import plan  # noqa: E402
from pipeline.config_files import load_run_config  # noqa: E402
from pipeline.jobs import OperatorJob  # noqa: E402
from pipeline.stages import operators  # noqa: E402


@task(name="fit-operators", task_run_name="operators {encoder_name} {tag}")
def fit_operators(
    job: OperatorJob, encoder_name: str, tag: str, progress: bool = True
) -> operators.OperatorResult:
    return operators.run(job, progress=progress)


@flow(name="reconlab-operators", log_prints=True)
def operators_flow(config_path: str, transform_names: list[str] | None = None, progress: bool = True):
    cfg = load_run_config(config_path)
    run = plan.build(cfg, Path(config_path))
    steps = run.operator_steps(transform_names)
    trained = train_flow(config_path, list(dict.fromkeys(s.encoder for s in steps)), progress)
    results = []
    for step in steps:
        for store in (step.identity_store, step.transform_store):
            encode_store(run.encode[store], progress)
        job = step.job(cfg, trained[step.encoder].checkpoint)
        results.append(
            fit_operators(job, step.encoder, f"{step.pair.transform.tag}-{step.pair.direction}", progress)
        )
    return results
