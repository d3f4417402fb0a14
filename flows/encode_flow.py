"""Prefect flow for the encode stage: one task per store of the run plan, `orchestration.parallel_tasks` at once;
the store itself is the cache (see docs/flows.md)."""

from __future__ import annotations

from pathlib import Path

from flows import prefect_env

prefect_env.configure()

from prefect import flow, task  # noqa: E402

from flows import tasks  # noqa: E402
from pipeline import plan  # noqa: E402
from pipeline.config_files import load_run_config  # noqa: E402
from pipeline.jobs import EncodeJob  # noqa: E402
from pipeline.stages import encode  # noqa: E402


@task(
    name="encode-store", task_run_name="encode {job.encoder.name} {job.split} {job.transform.tag}",
    tags=["reconlab", "stage:encode"], retry_condition_fn=tasks.transient,
)  # fmt: skip
def encode_store(job: EncodeJob, progress: bool = True):
    # Retrying is safe: a re-run skips the shards already done.
    result = encode.run(job, progress=progress)
    tasks.publish(
        f"store-{job.encoder.name}-{job.split}-{job.transform.tag}",
        f"**{result.store_path.name}**\n\n| images | encoded | failed | state |\n|---|---|---|---|\n"
        f"| {result.n_images} | {result.n_encoded} | {result.n_failed} | "
        f"{'cached' if result.already_complete else 'encoded now'} |\n\n`{result.store_path.resolve()}`",
        f"feature store of {job.encoder.name} on {job.split} ({job.transform.tag})",
    )
    state = "found" if result.already_complete else "written"
    return tasks.finished(result, result.already_complete, f"store {state} at {result.store_path}")


def encode_all(run: plan.RunPlan, paths, progress: bool) -> list[encode.EncodeResult]:
    """The stores at `paths` (plan keys) not yet made in this run, as concurrent tasks; what later stages call to
    make their inputs."""
    orch = run.cfg.orchestration
    task = encode_store.with_options(retries=orch.retries, retry_delay_seconds=orch.retry_delay_s)
    todo = [p for p in dict.fromkeys(paths) if p not in run.ensured]
    calls = [((run.encode[p], progress), {"encoder": run.encode[p].encoder.name}) for p in todo]
    results = tasks.in_waves(task, calls, orch.parallel_tasks)
    run.ensured.update(todo)
    return results


@flow(name="reconlab-encode", flow_run_name=tasks.run_name("encode"), log_prints=True)
def encode_flow(
    config_path: str, encoder_names: list[str] | None = None, progress: bool = True, force: bool = False
) -> list[encode.EncodeResult]:
    cfg = load_run_config(config_path)
    tasks.configure(cfg)
    if force:
        plan.force(cfg, Path(config_path), "encode")
    run = plan.build(cfg, Path(config_path), encoder_names)
    return encode_all(run, list(run.encode), progress)
