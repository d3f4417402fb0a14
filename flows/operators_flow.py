"""Prefect flow for the operators stage: the plan's stores of x and T(x) on the held-out split, the encoder's
reconstructor, then the operator fits (`orchestration.parallel_tasks` at once). Every step is cached on its own
outputs (stores, runs, operator folders)."""

from __future__ import annotations

from pathlib import Path

from flows import prefect_env

prefect_env.configure()

from prefect import flow  # noqa: E402

from flows import tasks  # noqa: E402
from flows.encode_flow import encode_all  # noqa: E402
from flows.train_flow import train_all  # noqa: E402
from pipeline import plan, plan_table  # noqa: E402
from pipeline.jobs import OperatorJob  # noqa: E402
from pipeline.stages import operators  # noqa: E402


@tasks.stage_task("operators", name="fit-operators", task_run_name="operators {encoder_name} {tag}")
def fit_operators(job: OperatorJob, encoder_name: str, tag: str, progress: bool = True):
    result = operators.run(job, progress=progress)
    tasks.publish(f"operators-{encoder_name}-{tag}", (result.out_dir / "fits.md").read_text(),
                  f"operator fits of {encoder_name}, {tag}")  # fmt: skip
    state = "found" if result.already_complete else "fitted"
    return tasks.finished(result, result.already_complete, f"operators {state} at {result.out_dir}")


def fit_all(run: plan.RunPlan, steps: list[plan.OperatorStep], trained: dict, progress: bool) -> list:
    """The stores of x and T(x) the steps need, then the fits, `orchestration.parallel_tasks` at once."""
    encode_all(run, [p for s in steps for p in (s.identity_store, s.transform_store)], progress)
    calls = [
        ((s.job(run.cfg, trained[s.encoder].checkpoint), s.encoder, f"{s.pair.transform.tag}-{s.pair.direction}",
          progress), {"encoder": s.encoder, "transform": s.pair.transform.tag})
        for s in steps
    ]  # fmt: skip
    return tasks.in_waves(fit_operators, calls, run.cfg.orchestration.parallel_tasks)


@flow(name="reconlab-operators", flow_run_name=tasks.run_name("operators"), log_prints=True)
def operators_flow(
    config_path: str, transform_names: list[str] | None = None, progress: bool = True, force: bool = False
) -> list[operators.OperatorResult]:
    cfg = tasks.run_config(config_path)
    tasks.configure(cfg)
    if force:
        plan_table.force(cfg, Path(config_path), "operators")
    run = plan.build(cfg, Path(config_path))
    steps = run.operator_steps(transform_names)
    names = list(dict.fromkeys(s.encoder for s in steps))
    trained = train_all(plan.build(cfg, Path(config_path), names), progress)
    return fit_all(run, steps, trained, progress)
