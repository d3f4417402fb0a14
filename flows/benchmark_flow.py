"""The end-to-end benchmark: encode -> train -> operators -> evaluate as one Prefect flow (stages as subflows),
for `reconlab run`, schedules and deployments. Each stage returns at once for work already done."""

from __future__ import annotations

from pathlib import Path

from flows import prefect_env

prefect_env.configure()

from prefect import flow  # noqa: E402

from flows import tasks  # noqa: E402
from flows.encode_flow import encode_flow  # noqa: E402
from flows.evaluate_flow import evaluate_flow  # noqa: E402
from flows.operators_flow import operators_flow  # noqa: E402
from flows.train_flow import train_flow  # noqa: E402
from pipeline import plan  # noqa: E402
from pipeline.config_files import load_run_config  # noqa: E402


@flow(name="reconlab-benchmark", flow_run_name=tasks.run_name("benchmark"), log_prints=True)
def benchmark_flow(
    config_path: str, progress: bool = True, operators: bool = True, force: str | None = None
) -> dict:
    if force:  # the stage and every later one
        for removed in plan.force(load_run_config(config_path), Path(config_path), force):
            print(f"force {force}: removed {removed}")
    stores = encode_flow(config_path, None, progress)
    trained = train_flow(config_path, None, progress)
    fitted = operators_flow(config_path, None, progress) if operators else []
    report = evaluate_flow(config_path, progress)
    return {"stores": stores, "trained": trained, "operators": fitted, "evaluation": report}
