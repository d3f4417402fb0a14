"""Prefect flow for the SAE stage: the plan's train and held-out stores, the encoder's reconstructor, then one SAE
study per encoder (the sweep of sparse autoencoders, their metrics, stability and concepts seen through the
reconstructor; docs/sae.md). Every step is cached on its own outputs."""

from __future__ import annotations

from pathlib import Path

from flows import prefect_env

prefect_env.configure()

from prefect import flow, tags  # noqa: E402

from flows import tasks  # noqa: E402
from flows.encode_flow import encode_all  # noqa: E402
from flows.train_flow import train_all  # noqa: E402
from pipeline import plan  # noqa: E402
from pipeline.config_files import load_run_config  # noqa: E402
from pipeline.jobs import SaeJob  # noqa: E402
from pipeline.stages import sae  # noqa: E402


@tasks.stage_task("sae", name="sae-study", task_run_name="sae {encoder_name}")
def sae_study(job: SaeJob, encoder_name: str, progress: bool = True):
    result = sae.run(job, progress=progress)
    tasks.publish(f"sae-{encoder_name}", f"Report: `{result.report.resolve()}`\n\nSAEs: `{result.models_dir}`",
                  f"SAE study of {encoder_name}")  # fmt: skip
    state = "found" if result.already_complete else "written"
    return tasks.finished(result, result.already_complete, f"SAE report {state} at {result.report}")


def train_saes(run: plan.RunPlan, steps: list[plan.StudyStep], trained: dict, progress: bool) -> list:
    """The stores the studies need, then the studies, one at a time (each uses the device)."""
    encode_all(run, [p for s in steps for p in (s.train_store, s.eval_store)], progress)
    results = []
    for step in steps:
        with tags(f"encoder:{step.encoder}"):
            job = run.study_job(step, trained[step.encoder].checkpoint)
            results.append(sae_study.submit(job, step.encoder, progress).result())
    return results


@flow(name="reconlab-sae", flow_run_name=tasks.run_name("sae"), log_prints=True)
def sae_flow(
    config_path: str, encoder_names: list[str] | None = None, progress: bool = True, force: bool = False
) -> list[sae.SaeResult]:
    cfg = load_run_config(config_path)
    tasks.configure(cfg)
    if force:
        plan.force(cfg, Path(config_path), "sae")
    run = plan.build(cfg, Path(config_path))
    steps = run.study_steps("sae", encoder_names)
    trained = train_all(plan.build(cfg, Path(config_path), [s.encoder for s in steps]), progress)
    return train_saes(run, steps, trained, progress)
