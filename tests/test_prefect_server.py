"""Against a real Prefect server started here on 127.0.0.1: `reconlab serve` serves a deployment per stage; a stage
triggered through the API completes with its logs and its artifact; a second trigger finishes as cached; two
concurrent triggers of one artifact both end well; a SIGTERM to the serving process mid-stage ends the run Failed
and then serving; a serving process killed mid-stage resumes on the next trigger and ends with the same result as
an uninterrupted run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc, signals"),
]


# a tiny store encodes in about a second here: the signal must land within its first shards
MID_STAGE_POLL_S = 0.02


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_LOGGING_LEVEL": "WARNING"}  # fmt: skip
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"

    def healthy() -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return proc.poll() is not None and pytest.skip("the Prefect server did not start")

    try:
        _wait(healthy, 120, "the Prefect server")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _serve(config: Path, url: str, home: Path) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(home), "RECONLAB_HOME": str(home)}
    for key in ("PREFECT_LOGGING_TO_API_ENABLED", "PREFECT_LOGGING_LEVEL"):  # as a user's shell has them
        env.pop(key, None)
    # Started as from a terminal, where Ctrl-C reaches it: a test run started as a background job ignores SIGINT
    # (the shell's rule for background jobs), and a child inherits an ignored signal.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", "-c", str(config)], cwd=ROOT, env=env,
            stdout=(home.parent / "serve.log").open("a"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop(serving: subprocess.Popen, home: Path) -> None:
    """Ctrl-C, as a user stops it; a process still up after 2 minutes (1-2 s here when idle) is killed and the
    test fails with the end of its log."""
    serving.send_signal(signal.SIGINT)
    try:
        serving.wait(timeout=120)
    except subprocess.TimeoutExpired:
        status = Path(f"/proc/{serving.pid}/status").read_text()  # SigIgn: signals it ignores
        serving.kill()
        tail = "".join(f"{line}\n" for line in status.splitlines() if line.startswith("Sig"))
        tail += (home.parent / "serve.log").read_text()[-3000:]
        pytest.fail(f"`reconlab serve` did not stop within 2 minutes of SIGINT; its log ends:\n{tail}")


@pytest.fixture(scope="module")
def config(tmp_path_factory, demo_root):
    import yaml

    root = tmp_path_factory.mktemp("served")
    data = {
        "store_root": str(root / "stores"),
        "dataset": {"name": "demo", "kind": "demo", "root": str(demo_root)},
        "splits": ["train", "val"],
        "encoders": ["tiny-vit-64", "tiny-vit-112", "tiny-vit-64-gray"],
        "store": {"shard_images": 2}, "encode": {"batch_size": 2, "num_workers": 0},
        "train": {"output_root": str(root / "train"), "epochs": 1, "batch_size": 8, "n_val_images": 8,
                  "n_sample_images": 2, "shuffle_buffer_images": 8},
        "operators": {"output_root": str(root / "operators"), "n_fit_images": 8, "n_eval_images": 4},
        "evaluate": {"output_root": str(root / "evaluate"), "judges": ["tiny-judge"], "n_boot": 200,
                     "n_permutations": 200},
    }  # fmt: skip
    path = root / "served.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def api(server):
    """This process talks to the test's server (Prefect reads its settings once; the env alone is not enough)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server}):
        yield server


def _client(url: str):
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _run(url: str, deployment: str, parameters: dict | None = None, timeout_s: float = 300):
    from prefect.deployments import run_deployment

    return run_deployment(deployment, parameters=parameters or {}, timeout=timeout_s)


def _task_states(client, flow_run_id) -> list[str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [r.state.name for r in runs if r.name.startswith("encode")]


def test_served_stages_run_log_publish_cache_queue_and_resume(server, api, config, tmp_path):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from storage import open_store

    home = tmp_path / "serve-home"
    serving = _serve(config, server, home)
    try:
        client = _client(server)
        _wait(
            lambda: _deployment_exists(client, "reconlab-encode/served-encode"), 120, "the served deployments"
        )

        # One stage, triggered through the API: completes, with its logs on the server and its artifact.
        first = _run(server, "reconlab-encode/served-encode", {"encoder_names": ["tiny-vit-64"]})
        assert first.state.is_completed(), first.state
        assert first.name == "encode served tiny-vit-64"
        assert "Completed" in _task_states(client, first.id)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[first.id])))
        assert logs, "no logs reached the server"
        assert any(log.name == "reconlab.progress" and "encode tiny-vit-64" in log.message for log in logs), [
            (log.name, log.message) for log in logs]  # fmt: skip
        artifacts = client.read_artifacts()  # keyed by the config's name first, as the deployments
        assert any(a.key and a.key.startswith("served-store-tiny-vit-64-") for a in artifacts)

        # A user error through a deployment's parameter: the run fails with the one line, no traceback in its logs.
        wrong = _run(server, "reconlab-encode/served-encode", {"encoder_names": ["tiny-vit-999"]})
        assert (
            wrong.state.is_failed()
            and "encoder_names`: 'tiny-vit-999' is not an encoder of" in wrong.state.message
        )
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[wrong.id])))
        assert logs and not any("Traceback" in log.message for log in logs), [log.message for log in logs]

        # The same stage again: every task says it found its store.
        again = _run(server, "reconlab-encode/served-encode", {"encoder_names": ["tiny-vit-64"]})
        assert again.state.is_completed() and set(_task_states(client, again.id)) == {"Cached"}

        # Two triggers of the same training at once: the second waits in the deployment's queue, both end well.
        from prefect.deployments import run_deployment

        pending = [run_deployment("reconlab-train/served-train", parameters={"encoder_names": ["tiny-vit-64"]},
                                  timeout=0) for _ in range(2)]  # fmt: skip
        done = [_wait(lambda r=r: _final(client, r.id), 600, "both training runs") for r in pending]
        assert all(s.is_completed() for s in done), done
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in pending]))
        )
        assert any(log.name == "reconlab.train" and "epoch 1 of 1" in log.message for log in logs), [
            (log.name, log.message) for log in logs]  # fmt: skip
    finally:
        _stop(serving, home)

    # Killed mid-encode (SIGKILL of the serving process), then served again and triggered again: it resumes.
    serving = _serve(config, server, home)
    stores = config.parent / "stores"
    try:
        killed = _encode_under_way(client, stores, "tiny-vit-112")
        os.kill(serving.pid, signal.SIGKILL)
        serving.wait()
        # the reaper ends the flow run the serving process had started, with a SIGTERM: Prefect records a crash,
        # and the deployment's slot is free for the next run
        assert _wait(lambda: _final(client, killed.id), 30, "the killed run's final state").is_crashed()
        targets = [p for p in stores.glob("tiny-vit-112__*.zarr") if (p / "zarr.json").is_file()]
        assert len(targets) < 2 or not all(open_store(p, require_complete=False).complete for p in targets)
    finally:
        if serving.poll() is None:
            serving.kill()
    serving = _serve(config, server, home)
    try:
        _wait(
            lambda: _deployment_exists(client, "reconlab-encode/served-encode"), 120, "the served deployments"
        )
        resumed = _run(server, "reconlab-encode/served-encode", {"encoder_names": ["tiny-vit-112"]})
        assert resumed.state.is_completed(), resumed.state
    finally:
        _stop(serving, home)
    _assert_equals_an_uninterrupted_encode(config, tmp_path)

    # Stopped mid-encode by a SIGTERM to the serving process alone (`kill`, `docker stop`): the run stops at a safe
    # point and records Failed, where Prefect's own handler left it Running and holding its deployment's slot;
    # serving then ends by itself.
    serving = _serve(config, server, home)
    try:
        stopped = _encode_under_way(client, stores, "tiny-vit-64-gray")
        serving.send_signal(signal.SIGTERM)
        serving.wait(timeout=90)
        ended = _wait(lambda: _final(client, stopped.id), 30, "the stopped run's final state")
        assert ended.is_failed() and "kept; trigger the run again to resume" in ended.message, ended
    finally:
        if serving.poll() is None:
            serving.kill()


def _encode_under_way(client, stores: Path, encoder: str):
    """Once the served deployments exist: an encode of `encoder` triggered, and its first shards written."""
    from prefect.deployments import run_deployment

    _wait(lambda: _deployment_exists(client, "reconlab-encode/served-encode"), 120, "the served deployments")
    flow_run = run_deployment(
        "reconlab-encode/served-encode", parameters={"encoder_names": [encoder]}, timeout=0
    )
    _wait(lambda: _shards_done(stores, encoder), 300, f"the first shards of {encoder}", MID_STAGE_POLL_S)
    return flow_run


def _shards_done(stores: Path, encoder: str) -> int:
    from storage import open_store

    return sum(int(open_store(p, require_complete=False).shard_done().sum())
               for p in stores.glob(f"{encoder}__*.zarr") if (p / "zarr.json").is_file())  # fmt: skip


def _deployment_exists(client, name: str) -> bool:
    try:
        client.read_deployment_by_name(name)
        return True
    except Exception:
        return False


def _final(client, flow_run_id):
    state = client.read_flow_run(flow_run_id).state
    return state if state.is_final() else None


def _assert_equals_an_uninterrupted_encode(config: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    from pipeline import plan
    from pipeline.config_files import load_run_config
    from pipeline.stages import encode
    from storage import open_store

    run = plan.build(load_run_config(config), config, ["tiny-vit-112"])
    for path, job in run.encode.items():
        fresh = encode.run(replace(job, store_root=tmp_path / "fresh"), progress=False).store_path
        np.testing.assert_array_equal(open_store(path).features(), open_store(fresh).features())


def test_prefect_deploy_puts_every_flow_on_its_work_pool(server, api):
    from prefect.client.schemas.actions import WorkPoolCreate

    client = _client(server)
    for pool in ("reconlab-cpu", "reconlab-gpu"):
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    env = {**os.environ, "PREFECT_API_URL": server, "RECONLAB_DIR": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    pools = {}
    for flow, stage in [("reconlab-encode", "encode"), ("reconlab-train", "train"),
                        ("reconlab-operators", "operators"), ("reconlab-evaluate", "evaluate"),
                        ("reconlab-benchmark", "benchmark")]:  # fmt: skip
        deployment = client.read_deployment_by_name(f"{flow}/demo-{stage}")
        pools[stage] = deployment.work_pool_name
        assert deployment.parameters["config_path"] == str(ROOT / "configs" / "demo.yaml")
    assert pools == {"encode": "reconlab-gpu", "train": "reconlab-gpu", "operators": "reconlab-cpu",
                     "evaluate": "reconlab-cpu", "benchmark": "reconlab-cpu"}  # fmt: skip

    # What a worker runs before the flow: its pull steps, as `prefect deploy` filled them in
    import asyncio

    from prefect.deployments.steps.core import StepExecutionError, run_steps

    def pull() -> None:
        steps = client.read_deployment_by_name("reconlab-encode/demo-encode").pull_steps
        here = os.getcwd()
        try:
            asyncio.run(run_steps(steps, print_function=lambda *a: None))
            assert Path.cwd() == ROOT  # the checkout, where the entrypoints are
        finally:
            os.chdir(here)

    pull()
    unset = {k: v for k, v in env.items() if k != "RECONLAB_DIR"}
    done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=ROOT, env=unset,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0  # Prefect only warns; the run then says why it cannot start
    with pytest.raises(StepExecutionError) as failed:
        pull()
    assert "made without RECONLAB_DIR" in str(failed.value.__cause__ or failed.value)
