"""Prefect flow for the encode stage: one task per store of the run plan, `orchestration.parallel_tasks` at once;
the store itself is the cache (see docs/flows.md)."""

from __future__ import annotations

from pathlib import Path

from flows import prefect_env

prefect_env.configure()

from prefect import flow  # noqa: E402

from flows import tasks  # noqa: E402
from pipeline import plan, plan_table  # noqa: E402
from pipeline.jobs import EncodeJob  # noqa: E402
from pipeline.stages import encode  # noqa: E402


@tasks.stage_task(
    "encode", name="encode-store", task_run_name="encode {label}", retry_condition_fn=tasks.transient
)
def encode_stores(jobs: list[EncodeJob], label: str, progress: bool = True):
    """The stores of one forward pass: one feature layer, or several layers of one encoder."""
    # Retrying is safe: a re-run skips the shards already done.
    results = encode.run_layers(jobs, progress=progress)
    for job, result in zip(jobs, results, strict=True):
        tasks.publish(
            f"store-{job.encoder.name}-{job.split}-{job.transform.tag}",
            f"**{result.store_path.name}**\n\n| images | encoded | failed | state |\n|---|---|---|---|\n"
            f"| {result.n_images} | {result.n_encoded} | {result.n_failed} | "
            f"{'cached' if result.already_complete else 'encoded now'} |\n\n`{result.store_path.resolve()}`"
            + (f"\n\ntime: {result.timing()}" if result.seconds else ""),
            f"feature store of {job.encoder.name} on {job.split} ({job.transform.tag})",
        )
    cached = all(r.already_complete for r in results)
    where = ", ".join(str(r.store_path) for r in results)
    return tasks.finished(results, cached, f"{'found' if cached else 'written'}: {where}")


def encode_all(run: plan.RunPlan, paths, progress: bool) -> list[encode.EncodeResult]:
    """The stores at `paths` (plan keys) not yet made in this run, as concurrent tasks (one per forward pass:
    the layers of one encoder share one); what later stages call to make their inputs."""
    orch = run.cfg.orchestration
    task = encode_stores.with_options(retries=orch.retries, retry_delay_seconds=orch.retry_delay_s)
    todo = [p for p in dict.fromkeys(paths) if p not in run.ensured]
    calls = []
    for group in run.one_pass_groups(todo):
        jobs = [run.encode[p] for p in group]
        names = [job.encoder.name for job in jobs]
        label = " ".join([names[0] + (f" +{len(names) - 1} layers" if len(names) > 1 else ""), jobs[0].split,
                          jobs[0].transform.tag])  # fmt: skip
        calls.append(((jobs, label, progress), {"encoder": names[0]}))
    results = [r for group in tasks.in_waves(task, calls, orch.parallel_tasks) for r in group]
    run.ensured.update(todo)
    return results


@flow(name="reconlab-encode", flow_run_name=tasks.run_name("encode"), log_prints=True)
def encode_flow(
    config_path: str, encoder_names: list[str] | None = None, progress: bool = True, force: bool = False
) -> list[encode.EncodeResult]:
    cfg = tasks.run_config(config_path)
    tasks.configure(cfg)
    if force:
        plan_table.force(cfg, Path(config_path), "encode")
    run = plan.build(cfg, Path(config_path), encoder_names)
    return encode_all(run, list(run.encode), progress)
