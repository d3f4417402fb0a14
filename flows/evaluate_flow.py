"""Prefect flow for the evaluate stage: the plan's held-out stores and every evaluated encoder's reconstructor
(cached), then scores, statistics and the report."""

from __future__ import annotations

from pathlib import Path

from flows import prefect_env

prefect_env.configure()

from prefect import flow, task  # noqa: E402

from flows.encode_flow import encode_store  # noqa: E402
from flows.train_flow import train_flow  # noqa: E402
from pipeline import plan  # noqa: E402
from pipeline.config import EncoderSpec, EvaluateConfig  # noqa: E402
from pipeline.config_files import load_run_config  # noqa: E402
from pipeline.jobs import EvalTarget  # noqa: E402
from pipeline.stages import evaluate  # noqa: E402


@task(name="evaluate")
def evaluate_task(
    targets: list[EvalTarget], cfg: EvaluateConfig, judges: list[EncoderSpec], progress: bool = True
) -> evaluate.EvaluateResult:
    return evaluate.run(targets, cfg, evaluate.load_judges(judges, cfg.device), progress=progress)


@flow(name="reconlab-evaluate", log_prints=True)
def evaluate_flow(config_path: str, progress: bool = True) -> evaluate.EvaluateResult:
    cfg = load_run_config(config_path)
    run = plan.build(cfg, Path(config_path), cfg.evaluate.encoders)
    trained = train_flow(config_path, list(run.evaluate), progress)
    for store in run.evaluate.values():
        encode_store(run.encode[store], progress)
    targets = run.eval_targets({name: result.checkpoint for name, result in trained.items()})
    return evaluate_task(targets, cfg.evaluate, run.judges, progress)
