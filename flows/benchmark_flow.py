"""The end-to-end benchmark: encode -> train -> operators -> evaluate as one Prefect flow (stages as subflows),
for `reconlab run` and for schedules. Each stage returns at once for work already done."""

from __future__ import annotations

from flows import prefect_env

prefect_env.configure()

from prefect import flow  # noqa: E402

from flows.encode_flow import encode_flow  # noqa: E402
from flows.evaluate_flow import evaluate_flow  # noqa: E402
from flows.operators_flow import operators_flow  # noqa: E402
from flows.train_flow import train_flow  # noqa: E402


@flow(name="reconlab-benchmark", log_prints=True)
def benchmark_flow(config_path: str, progress: bool = True, operators: bool = True) -> dict:
    stores = encode_flow(config_path, None, progress)
    trained = train_flow(config_path, None, progress)
    fitted = operators_flow(config_path, None, progress) if operators else []
    report = evaluate_flow(config_path, progress)
    return {"stores": stores, "trained": trained, "operators": fitted, "evaluation": report}
