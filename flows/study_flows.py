"""Prefect flows of the study stages, which study one encoder's stores through its reconstructor: token utility
(docs/tokens.md) and sparse autoencoders (docs/sae.md). Each flow: the plan's train and held-out stores, the
encoder's reconstructor, then one study task per encoder, one at a time (each uses the device). Every step is cached
on its own outputs (stores, training runs, the trained networks, the evaluation)."""

from __future__ import annotations

from pathlib import Path

from flows import prefect_env

prefect_env.configure()

from prefect import flow, tags  # noqa: E402

from flows import tasks  # noqa: E402
from flows.encode_flow import encode_all  # noqa: E402
from flows.train_flow import train_all  # noqa: E402
from pipeline import plan, plan_table  # noqa: E402
from pipeline.stages import captions, sae, tokens  # noqa: E402


def _finish(stage: str, result, encoder_name: str, what: str):
    tasks.publish(
        f"{stage}-{encoder_name}", f"Report: `{result.report.resolve()}`", f"{what} of {encoder_name}"
    )
    state = "found" if result.already_complete else "written"
    return tasks.finished(result, result.already_complete, f"{what} report {state} at {result.report}")


@tasks.stage_task("tokens", name="token-utility", task_run_name="tokens {encoder_name}")
def token_study(job, encoder_name: str, progress: bool = True):
    return _finish("tokens", tokens.run(job, progress=progress), encoder_name, "token utility study")


@tasks.stage_task("sae", name="sae-study", task_run_name="sae {encoder_name}")
def sae_study(job, encoder_name: str, progress: bool = True):
    return _finish("sae", sae.run(job, progress=progress), encoder_name, "SAE study")


@tasks.stage_task("captions", name="text-encode", task_run_name="captions {encoder_name} {split}")
def encode_captions(job, encoder_name: str, split: str, progress: bool = True):
    result = captions.run(job, progress=progress)
    state = "found" if result.already_complete else "written"
    return tasks.finished(
        result, result.already_complete, f"{result.n_captions} captions {state} at {result.path}"
    )


TASKS = {"tokens": token_study, "sae": sae_study}


def study_all(run: plan.RunPlan, steps: list[plan.StudyStep], trained: dict, progress: bool) -> list:
    """The stores the studies need, then the studies, one at a time."""
    encode_all(run, [p for s in steps for p in (s.train_store, s.eval_store)], progress)
    for path in dict.fromkeys(p for s in steps for p in (s.text_train, s.text_eval) if p is not None):
        job = run.captions[path]
        with tags(f"encoder:{job.encoder.name}"):
            encode_captions.submit(job, job.encoder.name, job.split, progress).result()
    results = []
    for step in steps:
        with tags(f"encoder:{step.encoder}"):
            job = run.study_job(step, trained[step.encoder].checkpoint)
            results.append(TASKS[step.stage].submit(job, step.encoder, progress).result())
    return results


def _study(
    stage: str, config_path: str, encoder_names: list[str] | None, progress: bool, force: bool
) -> list:
    cfg = tasks.run_config(config_path)
    tasks.configure(cfg)
    if force:
        plan_table.force(cfg, Path(config_path), stage)
    run = plan.build(cfg, Path(config_path))
    steps = run.study_steps(stage, encoder_names)
    trained = train_all(plan.build(cfg, Path(config_path), [s.encoder for s in steps]), progress)
    return study_all(run, steps, trained, progress)


@flow(name="reconlab-tokens", flow_run_name=tasks.run_name("tokens"), log_prints=True)
def tokens_flow(
    config_path: str, encoder_names: list[str] | None = None, progress: bool = True, force: bool = False
) -> list[tokens.TokensResult]:
    return _study("tokens", config_path, encoder_names, progress, force)


@flow(name="reconlab-sae", flow_run_name=tasks.run_name("sae"), log_prints=True)
def sae_flow(
    config_path: str, encoder_names: list[str] | None = None, progress: bool = True, force: bool = False
) -> list[sae.SaeResult]:
    return _study("sae", config_path, encoder_names, progress, force)
