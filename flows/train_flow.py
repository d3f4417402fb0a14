"""Prefect flow for the train stage: make sure the train/val stores exist (encode returns at once when they
do), then train one reconstructor per encoder. Each stage is idempotent on its own outputs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from flows import prefect_env

prefect_env.configure()

from prefect import flow, task  # noqa: E402

from flows.encode_flow import encode_store  # noqa: E402
from pipeline import plan  # noqa: E402
from pipeline.config import TransformSpec  # noqa: E402
from pipeline.config_files import load_run_config  # noqa: E402
from pipeline.stages import train  # noqa: E402


@task(name="train-reconstructor", task_run_name="train {encoder_name}")
def train_reconstructor(job: train.TrainJob, encoder_name: str, progress: bool = True) -> train.TrainResult:
    return train.run(job, progress=progress)


@flow(name="reconlab-train", log_prints=True)
def train_flow(
    config_path: str, encoder_names: list[str] | None = None, progress: bool = True
) -> dict[str, train.TrainResult]:
    cfg = load_run_config(config_path)
    identity = [
        j
        for j in plan.jobs_from_config(cfg, Path(config_path), encoder_names)
        if j.transform == TransformSpec()
    ]
    results = {}
    for encoder_name in dict.fromkeys(j.encoder.name for j in identity):
        base = next(j for j in identity if j.encoder.name == encoder_name)
        stores = {
            split: encode_store(replace(base, split=split), progress).store_path
            for split in (cfg.train.train_split, cfg.train.val_split)
        }
        job = train.TrainJob(stores[cfg.train.train_split], stores[cfg.train.val_split], cfg.train)
        results[encoder_name] = train_reconstructor(job, encoder_name, progress)
    return results
