"""Prefect flow for the evaluate stage: the plan's held-out stores and every evaluated encoder's reconstructor
(cached), then scores, statistics and the report."""

from __future__ import annotations

from pathlib import Path

from flows import prefect_env

prefect_env.configure()

from prefect import flow  # noqa: E402

from flows import tasks  # noqa: E402
from flows.encode_flow import encode_all  # noqa: E402
from flows.train_flow import train_all  # noqa: E402
from pipeline import plan, plan_table  # noqa: E402
from pipeline.config import EncoderSpec, EvaluateConfig  # noqa: E402
from pipeline.jobs import EvalTarget  # noqa: E402
from pipeline.stages import evaluate  # noqa: E402


@tasks.stage_task("evaluate", name="evaluate", task_run_name="evaluate and report")
def evaluate_task(
    targets: list[EvalTarget], cfg: EvaluateConfig, judges: list[EncoderSpec], progress: bool = True
):
    result = evaluate.run(targets, cfg, evaluate.load_judges(judges, cfg.device), progress=progress)
    primary = result.analysis["rankings"][result.analysis["primary"]]
    tasks.publish("evaluation-report", f"Report: `{result.report_html.resolve()}`\n\nRanking by "
                  f"{' / '.join(result.analysis['primary'])}:\n\n{primary.to_markdown(index=False)}",
                  "encoder ranking and the report")  # fmt: skip
    state = "found" if result.already_complete else "written"
    return tasks.finished(result, result.already_complete, f"report {state} at {result.report_html}")


def evaluate_all(run: plan.RunPlan, trained: dict, progress: bool) -> evaluate.EvaluateResult:
    """The held-out stores, then scores, statistics and the report."""
    encode_all(run, list(run.evaluate.values()), progress)
    targets = run.eval_targets({name: result.checkpoint for name, result in trained.items()})
    return evaluate_task.submit(targets, run.cfg.evaluate, run.judges, progress).result()


@flow(name="reconlab-evaluate", flow_run_name=tasks.run_name("evaluate"), log_prints=True)
def evaluate_flow(config_path: str, progress: bool = True, force: bool = False) -> evaluate.EvaluateResult:
    cfg = tasks.run_config(config_path)
    tasks.configure(cfg)
    if force:
        plan_table.force(cfg, Path(config_path), "evaluate")
    run = plan.build(cfg, Path(config_path), cfg.evaluate.encoders)
    trained = train_all(plan.build(cfg, Path(config_path), list(run.evaluate)), progress)
    return evaluate_all(run, trained, progress)
