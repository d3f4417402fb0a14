"""The end-to-end benchmark for `reconlab run`, schedules and deployments: one plan, then the stage tasks in order —
every store, every reconstructor, the operator fits, the evaluation, the token utility and SAE studies. Each returns at once for work already done."""

from __future__ import annotations

from pathlib import Path

from flows import prefect_env

prefect_env.configure()

from prefect import flow  # noqa: E402

from flows import tasks  # noqa: E402
from flows.encode_flow import encode_all  # noqa: E402
from flows.evaluate_flow import evaluate_all  # noqa: E402
from flows.operators_flow import fit_all  # noqa: E402
from flows.study_flows import study_all  # noqa: E402
from flows.train_flow import train_all  # noqa: E402
from pipeline import plan, plan_table  # noqa: E402


@flow(name="reconlab-benchmark", flow_run_name=tasks.run_name("benchmark"), log_prints=True)
def benchmark_flow(
    config_path: str, progress: bool = True, operators: bool = True, force: str | None = None
) -> dict:
    cfg = tasks.run_config(config_path)
    tasks.configure(cfg)
    if force:  # the stage and every later one
        for removed in plan_table.force(cfg, Path(config_path), force):
            print(f"force {force}: removed {removed}")
    run = plan.build(cfg, Path(config_path))
    run = run if operators else run.without_operators()
    stores = encode_all(run, list(run.encode), progress)
    trained = train_all(run, progress)
    fitted = fit_all(run, run.operators, trained, progress) if operators else []
    return {
        "stores": stores,
        "trained": trained,
        "operators": fitted,
        "evaluation": evaluate_all(run, trained, progress),
        "tokens": study_all(run, run.studies["tokens"], trained, progress),
        "sae": study_all(run, run.studies["sae"], trained, progress),
    }
