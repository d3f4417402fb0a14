"""Prefect flow for the token utility stage: the plan's train and held-out stores, the encoder's reconstructor,
then one study per encoder (learned token selection vs random and token-norm selection; docs/tokens.md). Every
step is cached on its own outputs (stores, training runs, the trained networks, the evaluation)."""

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
from pipeline.jobs import TokensJob  # noqa: E402
from pipeline.stages import tokens  # noqa: E402


@tasks.stage_task("tokens", name="token-utility", task_run_name="tokens {encoder_name}")
def token_study(job: TokensJob, encoder_name: str, progress: bool = True):
    result = tokens.run(job, progress=progress)
    tasks.publish(f"tokens-{encoder_name}", f"Report: `{result.report.resolve()}`\n\nNetworks: `{result.networks_dir}`",
                  f"token utility study of {encoder_name}")  # fmt: skip
    state = "found" if result.already_complete else "written"
    return tasks.finished(result, result.already_complete, f"token utility report {state} at {result.report}")


def study_all(run: plan.RunPlan, steps: list[plan.StudyStep], trained: dict, progress: bool) -> list:
    """The stores the studies need, then the studies, one at a time (each uses the device)."""
    encode_all(run, [p for s in steps for p in (s.train_store, s.eval_store)], progress)
    results = []
    for step in steps:
        with tags(f"encoder:{step.encoder}"):
            job = run.study_job(step, trained[step.encoder].checkpoint)
            results.append(token_study.submit(job, step.encoder, progress).result())
    return results


@flow(name="reconlab-tokens", flow_run_name=tasks.run_name("tokens"), log_prints=True)
def tokens_flow(
    config_path: str, encoder_names: list[str] | None = None, progress: bool = True, force: bool = False
) -> list[tokens.TokensResult]:
    cfg = load_run_config(config_path)
    tasks.configure(cfg)
    if force:
        plan.force(cfg, Path(config_path), "tokens")
    run = plan.build(cfg, Path(config_path))
    steps = run.study_steps("tokens", encoder_names)
    trained = train_all(plan.build(cfg, Path(config_path), [s.encoder for s in steps]), progress)
    return study_all(run, steps, trained, progress)
