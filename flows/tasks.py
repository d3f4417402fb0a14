"""What every stage flow shares: run names and tags, task states that say whether work was done or found cached,
Prefect artifacts that show each result in the UI, retries on transient faults only, and running tasks in waves
of `orchestration.parallel_tasks`."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from flows import interrupts, prefect_env

prefect_env.configure()
prefect_env.temporary_server_in_own_session()
prefect_env.served_run_logging()  # before a flow's first line: its config may already be wrong

from prefect import tags, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.states import Completed, State  # noqa: E402

from flows.errors import is_reported  # noqa: E402
from pipeline.config import RunConfig  # noqa: E402


def run_name(stage: str) -> Callable[[], str]:
    """Flow run names like 'encode demo tiny-vit-112' from the run's parameters (not Prefect's random words)."""

    def name() -> str:
        from prefect.runtime import flow_run

        params = flow_run.parameters
        filters = params.get("encoder_names") or params.get("transform_names") or []
        return " ".join([stage, Path(params["config_path"]).stem, *filters])

    return name


def stage_task(stage: str, **options):
    """A Prefect task running one stage's work. No Prefect caching and no result persistence: each stage finds its
    own finished artifact (pipeline/artifacts.py), so hashing the inputs and pickling the results would be pure
    cost (and a cached Prefect result can outlive a deleted artifact)."""
    return task(cache_policy=NO_CACHE, persist_result=False, tags=["reconlab", f"stage:{stage}"], **options)


def configure(cfg: RunConfig) -> None:
    """Settings a flow run applies before its stages: how long to wait for another run's lock; a served run
    stops at a safe point on Ctrl-C (flows/interrupts.py)."""
    os.environ["RECONLAB_LOCK_WAIT_S"] = str(cfg.orchestration.lock_wait_s)
    interrupts.in_a_served_run()
    prefect_env.served_run_logging()


def run_config(config_path: str) -> RunConfig:
    """The flow's config; a path that `prefect deploy` built without RECONLAB_DIR says so."""
    from pipeline.config import ConfigError
    from pipeline.config_files import load_run_config

    try:
        return load_run_config(config_path)
    except ConfigError as e:
        if str(config_path).startswith("/configs/") and not Path(config_path).exists():
            raise ConfigError(f"{e} (a deployment from prefect.yaml names configs under $RECONLAB_DIR, which was "
                              "not set when `prefect deploy` ran: set it to the checkout and deploy again)") from None  # fmt: skip
        raise


def task_runner(cfg: RunConfig):
    """The Prefect task runner `orchestration.task_runner` names."""
    orch = cfg.orchestration
    if orch.task_runner == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=orch.parallel_tasks)
    from prefect_dask import DaskTaskRunner

    if orch.dask_address:
        return DaskTaskRunner(address=orch.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": orch.parallel_tasks, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None})  # fmt: skip


def for_config(flow, config_path: str | Path):
    """`flow` with the task runner of the config at `config_path`. The lock wait is set first, so the workers of
    a local Dask cluster inherit it (a remote cluster's workers need RECONLAB_LOCK_WAIT_S in their own env)."""
    from pipeline.config_files import load_run_config

    cfg = load_run_config(config_path)
    configure(cfg)
    return flow.with_options(task_runner=task_runner(cfg))


def transient(task, task_run, state) -> bool:
    """Retry condition: a fault that may pass (I/O, device), never a user error or an environment fault that the
    CLI reports in one line (config, weights, held-out checks, full disk, permissions)."""
    try:
        state.result()
    except Exception as e:
        return not is_reported(e)
    return False


def finished(result, cached: bool, message: str) -> State:
    """The task's final state: 'Cached' when the artifact was already there, 'Completed' when work was done."""
    return Completed(name="Cached" if cached else "Completed", message=message, data=result)


def publish(key: str, markdown: str, description: str) -> None:
    """A Prefect artifact (markdown) under a stable key, so the UI shows the latest result of each artifact: the
    config's name first (as in the deployments' names), so two configs on one server keep theirs apart."""
    from prefect.runtime import flow_run

    try:
        config_path = flow_run.parameters.get("config_path")
    except Exception:  # a task on a Dask worker with no way to the API: the key without it
        config_path = None
    key = f"{Path(config_path).stem}-{key}" if config_path else key
    key = re.sub(r"[^a-z0-9-]+", "-", key.lower()).strip("-")[:200]
    create_markdown_artifact(markdown=markdown, key=key, description=description)


def in_waves(task, calls: Iterable[tuple[tuple, dict[str, str]]], width: int) -> list:
    """Submit `task(*args)` for each (args, tags) at most `width` at a time; results in order."""
    results, wave = [], []
    for args, labels in calls:
        with tags(*(f"{k}:{v}" for k, v in labels.items())):
            wave.append(task.submit(*args))
        if len(wave) == width:
            results += [future.result() for future in wave]
            wave = []
    return results + [future.result() for future in wave]
