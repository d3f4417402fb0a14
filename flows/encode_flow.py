"""Prefect flow for the encode stage: one task per store of the run plan; the store itself is the cache (see
docs/flows.md)."""

from __future__ import annotations

from pathlib import Path

from flows import prefect_env

prefect_env.configure()

from prefect import flow, task  # noqa: E402

from pipeline import plan  # noqa: E402
from pipeline.config_files import load_run_config  # noqa: E402
from pipeline.jobs import EncodeJob  # noqa: E402
from pipeline.stages import encode  # noqa: E402


@task(
    name="encode-store", task_run_name="encode {job.encoder.name} {job.split} {job.transform.tag}", retries=1
)
def encode_store(job: EncodeJob, progress: bool = True) -> encode.EncodeResult:
    # Retrying is safe: a re-run skips the shards already done.
    return encode.run(job, progress=progress)


@flow(name="reconlab-encode", log_prints=True)
def encode_flow(config_path: str, encoder_names: list[str] | None = None, progress: bool = True):
    run = plan.build(load_run_config(config_path), Path(config_path), encoder_names)
    # Sequential on purpose: each encode already uses every core (DataLoader workers + intra-op threads).
    return [encode_store(job, progress) for job in run.encode.values()]
