"""Prefect flow for the train stage: the plan's train/val stores (encode returns at once when they exist), then one
reconstructor per encoder. Each stage is idempotent on its own outputs."""

from __future__ import annotations

from pathlib import Path

from flows import prefect_env

prefect_env.configure()

from prefect import flow, task  # noqa: E402

from flows.encode_flow import encode_store  # noqa: E402
from pipeline import plan  # noqa: E402
from pipeline.config_files import load_run_config  # noqa: E402
from pipeline.jobs import TrainJob  # noqa: E402
from pipeline.stages import train  # noqa: E402


@task(name="train-reconstructor", task_run_name="train {encoder_name}")
def train_reconstructor(job: TrainJob, encoder_name: str, progress: bool = True) -> train.TrainResult:
    return train.run(job, progress=progress)


@flow(name="reconlab-train", log_prints=True)
def train_flow(
    config_path: str, encoder_names: list[str] | None = None, progress: bool = True
) -> dict[str, train.TrainResult]:
    run = plan.build(load_run_config(config_path), Path(config_path), encoder_names)
    results = {}
    for name, job in run.train.items():
        for store in (job.train_store, job.val_store):
            encode_store(run.encode[store], progress)
        results[name] = train_reconstructor(job, name, progress)
    return results
