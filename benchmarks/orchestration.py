"""What Prefect costs a run, each measurement in a fresh working folder (its own data/, runs/, .reconlab/):
  - start-up: imports only, and Prefect's temporary server in a new and in an existing home;
  - the demo from nothing: the plan's stage functions in one plain process (the baseline), `reconlab run` with no
    server (temporary server), `reconlab run` against a configured server (PREFECT_API_URL, started here);
  - for the served run, the flow's own time against the sum of its stage tasks' run times (read from the API):
    the orchestration overhead proper, without start-up;
  - a fully cached `reconlab run` and `reconlab train`, and `reconlab plan`.
Run from the repository root:
    .venv/bin/python benchmarks/orchestration.py [--config configs/demo.yaml]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "flows.cli"]
EMPTY_FLOW = (
    "from flows import prefect_env; prefect_env.configure(); from prefect import flow; flow(lambda: 1)()"
)


def timed(cmd: list[str], cwd: Path, api_url: str | None = None, log: dict | None = None) -> float:
    """Wall seconds of `cmd`; with `log`, the run logs at DEBUG and log['retries'] counts the API calls Prefect's
    client retried after an HTTP 503 (the server's SQLite 'database is locked'), each ~2 s of back-off."""
    start = time.perf_counter()
    env = _env(cwd, api_url) | ({"PREFECT_LOGGING_LEVEL": "DEBUG"} if log is not None else {})
    out = subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True, env=env)
    if log is not None:
        log["retries"] = (out.stdout + out.stderr).count("retryable status code 503")
    return time.perf_counter() - start


def _env(cwd: Path, api_url: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PYTHONPATH": str(ROOT), "RECONLAB_HOME": str(cwd / ".reconlab")}
    return env | ({"PREFECT_API_URL": api_url} if api_url else {})


def plain(config: str) -> None:
    """Every stage of the plan, in this process, without Prefect (the baseline)."""
    from pipeline import plan
    from pipeline.config_files import load_run_config

    plan.execute(plan.build(load_run_config(config), Path(config)))


def start_server(home: Path, database_url: str | None = None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _env(home) | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                        "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_LOGGING_LEVEL": "WARNING"}  # fmt: skip
    if database_url:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the Prefect server did not start in 120 s")


def flow_timeline(url: str) -> dict[str, float]:
    """The latest flow run as the server recorded it: its duration, the time covered by its task runs (each a
    stage's work: encode stores, train, fit, evaluate; overlapping runs counted once), and where the rest went:
    before the first task (config, plan, image lists, store keys: the plain baseline does this too), between
    tasks, after the last."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        run = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    spans = sorted((t.start_time, t.end_time) for t in tasks if t.start_time and t.end_time)
    covered, end = 0.0, None
    for start, stop in spans:
        start = max(start, end) if end else start
        if stop > start:
            covered += (stop - start).total_seconds()
            end = stop
    flow_s = (run.end_time - run.start_time).total_seconds()
    before = (spans[0][0] - run.start_time).total_seconds()
    after = (run.end_time - max(stop for _, stop in spans)).total_seconds()
    return {"flow": flow_s, "tasks": covered, "n_tasks": len(spans), "before first task": before,
            "between tasks": flow_s - covered - before - after, "after last task": after}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument(
        "--served-only", action="store_true", help="Only the run against a configured server."
    )
    parser.add_argument("--server-database", help="The server's database URL (default: SQLite in its home), e.g. "
                        "postgresql+asyncpg://postgres@127.0.0.1:5432/prefect")  # fmt: skip
    args = parser.parse_args()
    config = str(Path(args.config).resolve())
    run = [*CLI, "run", "-c", config, "--no-progress"]
    rows: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = {name: Path(tmp, name) for name in ("empty", "plain", "local", "served", "server")}
        for path in folder.values():
            path.mkdir()
        if args.served_only:
            return served_only(run, folder, args.server_database)
        rows["start-up: `reconlab --version` (imports only)"] = timed([*CLI, "--version"], folder["empty"])
        empty_flow = [sys.executable, "-c", EMPTY_FLOW]
        rows["start-up: an empty flow, temporary server, new Prefect home"] = timed(
            empty_flow, folder["empty"]
        )
        rows["start-up: an empty flow, temporary server, existing Prefect home"] = timed(
            empty_flow, folder["empty"]
        )
        base = rows["demo from nothing, plain stage functions (no Prefect)"] = timed(
            [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
             f"import orchestration; orchestration.plain({config!r})"], folder["plain"])  # fmt: skip
        local = rows["demo from nothing, `reconlab run`, no server (temporary server)"] = timed(
            run, folder["local"]
        )
        server, url = start_server(folder["server"])
        try:
            served = rows["demo from nothing, `reconlab run`, configured server"] = timed(
                run, folder["served"], url
            )
            timeline = flow_timeline(url)
            rows["cached `reconlab run`, configured server (a flow run, for the record)"] = timed(
                run, folder["served"], url
            )
        finally:
            os.killpg(server.pid, signal.SIGTERM)
        rows["cached `reconlab run`, no server (answered from the artifacts)"] = timed(run, folder["local"])
        rows["cached `reconlab train`, no server (a flow)"] = timed(
            [*CLI, "train", "-c", config, "--no-progress"], folder["local"]
        )
        rows["`reconlab plan` (never starts Prefect)"] = timed([*CLI, "plan", "-c", config], folder["local"])
    print(f"# orchestration cost, {Path(config).name}, CPU, fresh folder per measurement\n")
    print("| measurement | wall s |\n|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.1f} |")
    print_timeline(timeline)
    for name, total in (("no server", local), ("configured server", served)):
        print(
            f"end to end vs plain, {name}: {total - base:+.1f} s = {100 * (total - base) / base:+.1f}% of {base:.1f} s"
        )


def served_only(run: list[str], folder: dict, database_url: str | None) -> None:
    server, url = start_server(folder["server"], database_url)
    log: dict = {}
    try:
        wall = timed(run, folder["served"], url, log)
        timeline = flow_timeline(url)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
    print(f"served demo ({'SQLite' if not database_url else database_url.split(':')[0]} server): "
          f"`reconlab run` {wall:.1f} s; {log['retries']} API calls retried after HTTP 503")  # fmt: skip
    print_timeline(timeline)


def print_timeline(timeline: dict) -> None:
    flow_s, task_s = timeline["flow"], timeline["tasks"]
    print(f"\nserved demo: flow {flow_s:.1f} s, {timeline['n_tasks']:.0f} task runs covering {task_s:.1f} s; "
          + ", ".join(f"{k} {timeline[k]:.1f} s" for k in ("before first task", "between tasks", "after last task")))  # fmt: skip
    print(
        f"flow time outside stage tasks: {flow_s - task_s:.1f} s = {100 * (flow_s - task_s) / flow_s:.1f}% of the flow"
    )
    orchestration = timeline["between tasks"] + timeline["after last task"]
    print(
        f"orchestration overhead (between and after tasks): {orchestration:.1f} s = {100 * orchestration / flow_s:.1f}%"
    )


if __name__ == "__main__":
    main()
