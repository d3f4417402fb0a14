"""Deployments of every stage flow and of the benchmark for one config: served together by `reconlab serve`, or
put on work pools by `prefect deploy` (prefect.yaml). Each runs one at a time per deployment: a second trigger
(or an overlapping scheduled run) waits in the queue instead of colliding with the first."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import typer

from flows import prefect_env

prefect_env.configure()

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy  # noqa: E402

from flows import tasks  # noqa: E402
from flows.benchmark_flow import benchmark_flow  # noqa: E402
from flows.encode_flow import encode_flow  # noqa: E402
from flows.evaluate_flow import evaluate_flow  # noqa: E402
from flows.operators_flow import operators_flow  # noqa: E402
from flows.study_flows import sae_flow, tokens_flow  # noqa: E402
from flows.train_flow import train_flow  # noqa: E402
from pipeline.config_files import load_run_config  # noqa: E402

STAGE_FLOWS = {"encode": encode_flow, "train": train_flow, "operators": operators_flow, "evaluate": evaluate_flow,
               "tokens": tokens_flow, "sae": sae_flow, "benchmark": benchmark_flow}  # fmt: skip


def deployments(config: Path, cron: str | None = None) -> list:
    """One deployment per stage flow (tokens, sae: where the config has their section) and one for the benchmark (scheduled by `cron` if given), named
    '<config stem>-<stage>', parameterised by the config's absolute path."""
    config = Path(config).resolve()
    cfg = load_run_config(config)
    one_at_a_time = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
    return [
        tasks.for_config(flow, config).to_deployment(
            name=f"{config.stem}-{stage}",
            parameters={"config_path": str(config), "progress": True},  # a log line every 30 s
            cron=cron if stage == "benchmark" else None,
            concurrency_limit=one_at_a_time,
            tags=["reconlab", f"config:{config.stem}", f"stage:{stage}"],
            description=f"reconlab {stage} for {config}",
        )
        for stage, flow in STAGE_FLOWS.items()
        if stage not in ("tokens", "sae") or getattr(cfg, stage) is not None
    ]


def serve(served: list, pause_on_stop: bool) -> None:
    """Prefect's `serve` of `served`, with its runner's SIGTERM taken as a Ctrl-C: the flow runs stop at a safe
    point and record it before serving ends (flows/interrupts.py). Prefect's own SIGTERM handler ended serving at
    once and left the running run Running on the server, holding its deployment's one slot."""
    from prefect.runner import Runner

    from flows.interrupts import flow_runs_stop_before_serving_ends

    typer.echo("deployments (trigger with `prefect deployment run NAME` or from the UI):")
    for deployment in served:
        typer.echo(f"  {deployment.flow_name}/{deployment.name}")
    with flow_runs_stop_before_serving_ends() as stop_serving:

        class _Runner(Runner):
            def handle_sigterm(self, *args, **kwargs) -> None:
                stop_serving(signal.SIGTERM)

        runner = _Runner(pause_on_shutdown=pause_on_stop)
        for deployment in served:
            runner.add_deployment(deployment)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(runner.start())
