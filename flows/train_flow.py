"""Prefect flow for the train stage: the plan's train/val stores (encode returns at once when they exist), then one
reconstructor per encoder. Each stage is idempotent on its own outputs."""

from __future__ import annotations

from pathlib import Path

from flows import prefect_env

prefect_env.configure()

from prefect import flow, tags  # noqa: E402

from flows import tasks  # noqa: E402
from flows.encode_flow import encode_all  # noqa: E402
from pipeline import plan, plan_table  # noqa: E402
from pipeline.jobs import TrainJob  # noqa: E402
from pipeline.stages import train  # noqa: E402


@tasks.stage_task("train", name="train-reconstructor", task_run_name="train {encoder_name}")
def train_reconstructor(job: TrainJob, encoder_name: str, progress: bool = True):
    result = train.run(job, progress=progress)
    m = result.val_metrics
    tasks.publish(
        f"train-{encoder_name}",
        f"**{result.run_dir.name}** ({'cached' if result.already_complete else 'trained now'})\n\n"
        "| val PSNR dB | val SSIM | val MSE | checkpoint |\n|---|---|---|---|\n"
        f"| {m['val_psnr_db']:.2f} | {m['val_ssim']:.3f} | {m['val_mse']:.4f} | `{result.checkpoint}` |",
        f"reconstructor of {encoder_name}",
    )
    state = "found" if result.already_complete else "trained"
    return tasks.finished(result, result.already_complete, f"reconstructor {state} at {result.run_dir}: val PSNR "
                          f"{m['val_psnr_db']:.2f} dB, SSIM {m['val_ssim']:.3f}")  # fmt: skip


def train_all(run: plan.RunPlan, progress: bool) -> dict[str, train.TrainResult]:
    """The plan's train/val stores, then one reconstructor per encoder, one at a time (each uses the device)."""
    encode_all(run, [p for job in run.train.values() for p in (job.train_store, job.val_store)], progress)
    results = {}
    for name, job in run.train.items():
        with tags(f"encoder:{name}"):
            results[name] = train_reconstructor.submit(job, name, progress).result()
    return results


@flow(name="reconlab-train", flow_run_name=tasks.run_name("train"), log_prints=True)
def train_flow(
    config_path: str, encoder_names: list[str] | None = None, progress: bool = True, force: bool = False
) -> dict[str, train.TrainResult]:
    cfg = tasks.run_config(config_path)
    tasks.configure(cfg)
    if force:
        plan_table.force(cfg, Path(config_path), "train")
    return train_all(plan.build(cfg, Path(config_path), encoder_names), progress)
