"""The Prefect flow and the CLI, end to end on the small demo set (Prefect runs offline, ephemeral)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import zarr
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


@pytest.mark.slow
def test_cli_encode_runs_the_flow_then_store_ls_and_inspect_describe_the_stores(write_run_config, tmp_path):
    # num_workers=2: DataLoader workers started from inside a Prefect flow (they must not be plain forks).
    config = write_run_config(
        splits=["val"], encoders=["tiny-vit-64", "tiny-vit-112"], encode={"batch_size": 8, "num_workers": 2},
        operators={"pairs": []}, train={"train_split": "val", "val_split": "val"},
    )  # fmt: skip
    result = runner.invoke(app, ["encode", "--config", str(config), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert result.output.count("encoded, 12/12 images, 0 failed") == 2, (
        result.output
    )  # the plan's encode rows
    # where each run's time went
    assert result.output.count("  time ") == 2 and "decode wait" in result.output

    again = runner.invoke(
        app, ["encode", "--config", str(config), "--encoder", "tiny-vit-64", "--no-progress"]
    )
    assert again.exit_code == 0 and again.output.count("already complete") == 1, again.output
    assert "  time " not in again.output

    listing = runner.invoke(app, ["store", "ls", str(tmp_path / "stores")])
    assert listing.exit_code == 0
    lines = [line for line in listing.output.splitlines() if "demo/val" in line]
    assert len(lines) == 2 and all("complete" in line and "float16" in line for line in lines)
    assert any("7x7x192" in line for line in lines) and any("4x4x192" in line for line in lines)
    assert listing.output.splitlines()[-1].startswith("2 stores, "), listing.output

    (store,) = (tmp_path / "stores").glob("tiny-vit-64__*.zarr")
    one = runner.invoke(app, ["store", "ls", str(store)])  # a store itself: its own line
    assert one.exit_code == 0 and len(one.output.splitlines()) == 2 and "4x4x192" in one.output, one.output
    assert (
        one.output.split()[-1] == store.name.rpartition("__")[2][: -len(".zarr")]
    )  # the key tells stores apart
    import shutil

    headless = (
        tmp_path / "copies" / "headless.zarr"
    )  # a store whose zarr.json was deleted: an error, not omitted
    shutil.copytree(store, headless)
    (headless / "zarr.json").unlink()
    copies = runner.invoke(app, ["store", "ls", str(headless.parent)])
    assert (
        copies.exit_code == 0
        and "headless.zarr: not a readable feature store: its zarr.json is missing" in (copies.output)
    ), copies.output
    text = runner.invoke(app, ["store", "inspect", str(store)])
    assert text.exit_code == 0 and "packages   " in text.output and "torch " in text.output, text.output
    preview = tmp_path / "preview.png"
    inspected = runner.invoke(app, ["store", "inspect", str(store), "--json", "--preview", str(preview)])
    assert inspected.exit_code == 0, inspected.output
    info = json.loads(inspected.output[: inspected.output.rindex("}") + 1])
    # float16 features in lz4 (compressor: auto) stay about their raw size; the ratio is reported either way
    assert info["complete"] and info["n_encoded"] == 12
    assert 0.9 < info["arrays"]["features"]["compression_ratio"] < 1.2
    assert info["feature_stats_sampled"]["fraction_nonfinite"] == 0
    assert info["decoding"] == {"resize": "torch", "jpeg_draft": "2x"}
    # everything: what tells a bf16_bitround store from a float32 one (both float32 arrays), and the identity
    attrs = zarr.open_group(str(store), mode="r").attrs
    for key in ("precision", "layout", "config", "dataset_source", "content_sha256"):
        assert info[key] == attrs[key], key
    assert preview.stat().st_size > 1000
    for given, written in (
        (tmp_path / "pca", tmp_path / "pca.png"),
        (tmp_path, tmp_path / f"{store.name}.preview.png"),
    ):
        shown = runner.invoke(app, ["store", "inspect", str(store), "--preview", str(given)])
        assert f"preview written to {written}" in shown.output and written.is_file(), shown.output


def test_cli_reports_a_bad_config_with_exit_code_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: {name: x, kind: demo}\nencoders: [tiny-vit-64]\nstore: {precision: float8}\n")
    result = runner.invoke(app, ["encode", "--config", str(bad)])
    assert result.exit_code == 2 and "store.precision" in result.output


def test_an_option_of_one_value_given_twice_is_refused_not_overridden(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    for args in (["plan", "--config", str(first), "--config", str(second)],
                 ["plan", f"--config={first}", "-c", str(second)],
                 ["store", "inspect", str(tmp_path), "--preview", "x", "--preview", "y"]):  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "given 2 times: give it once" in result.output, (args, result.output)
    once = runner.invoke(app, ["plan", "--config", str(first), "--", "--config"])  # after `--`: not an option
    assert "given 2 times" not in once.output and once.exit_code == 2  # a.yaml does not exist


def test_store_inspect_on_a_non_store_fails_cleanly(tmp_path):
    result = runner.invoke(app, ["store", "inspect", str(tmp_path)])
    assert result.exit_code == 2 and "not a feature store" in result.output


@pytest.mark.slow
def test_cli_run_chains_all_four_stages_through_prefect(write_run_config, tmp_path):
    config = write_run_config(
        splits=["train", "val"],
        subset={"max_images": 12},
        encoders=["tiny-vit-64", "tiny-vit-112"],
        train={"output_root": str(tmp_path / "train"), "epochs": 1, "batch_size": 6, "n_val_images": 6,
               "n_sample_images": 2, "shuffle_buffer_images": 6},
        operators={"output_root": str(tmp_path / "ops"), "encoders": ["tiny-vit-64"], "n_fit_images": 8,
                   "n_eval_images": 4, "n_grid_images": 2,
                   "pairs": [{"transform": {"name": "swap_rb"}}, {"transform": {"name": "grayscale"}, "direction": "inverse"}]},
        evaluate={"output_root": str(tmp_path / "eval"), "judges": ["tiny-judge"], "n_boot": 200, "n_grid_images": 2},
    )  # fmt: skip
    result = runner.invoke(app, ["run", "--config", str(config), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert result.output.count("val PSNR") == 2
    assert "swap_rb-forward" in result.output and "grayscale-inverse" in result.output
    assert "ranking by tiny-judge / cosine_grayscale" in result.output
    (report,) = (tmp_path / "eval").glob("report__*/report.html")
    assert report.stat().st_size > 10_000
    assert "Prefect not started" not in result.output

    # Everything cached and no server configured: answered from the artifacts, the same results.
    again = runner.invoke(app, ["run", "--config", str(config), "--no-progress"])
    assert again.exit_code == 0 and "Prefect not started" in again.output, again.output
    # the plan it printed knew: each encoder's scores and the report made from them are cached, where they are
    evaluate_rows = [line for line in again.output.splitlines() if line.startswith("evaluate ")]
    assert len(evaluate_rows) == 3 and all(" cached " in line for line in evaluate_rows), again.output
    assert str(report.parent) in evaluate_rows[-1] and "report of 2 encoders" in evaluate_rows[-1]
    ranking = result.output[result.output.index("ranking by") :]
    cached = " (cached: the same scores and settings made it before)"
    assert again.output[again.output.index("ranking by") :] == ranking.replace(
        "\nreport: ", f"\nreport{cached}: "
    )


def test_serve_without_a_prefect_server_explains_what_to_start(write_run_config, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    result = runner.invoke(app, ["serve", "--config", str(write_run_config()), "--cron", "0 2 * * *"])
    assert result.exit_code == 2 and "prefect server start" in result.output
    # set, but nothing listens there: one line, not a connection traceback
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{closed_port}/api")
    result = runner.invoke(app, ["serve", "--config", str(write_run_config())])
    assert result.exit_code == 2 and "no Prefect server answers at PREFECT_API_URL" in result.output, (
        result.output
    )


def test_prefect_failure_logs_of_user_errors_are_dropped_and_others_kept():
    import logging

    from flows import prefect_env
    from storage import StoreLocked

    prefect_env.quiet_user_errors()
    logger = logging.getLogger("prefect.task_runs")
    kept: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            kept.append(record.getMessage())

    handler = Collect()
    logger.addHandler(handler)
    try:
        for exc in (StoreLocked("locked"), RuntimeError("a bug")):
            try:
                raise exc
            except Exception:
                logger.error("Task run failed with exception: %r", exc, exc_info=True)
        logger.error("Finished in state Failed('Task run encountered an exception StoreLocked: locked')")
        logger.error("Finished in state Failed('Task run encountered an exception RuntimeError: a bug')")
        logger.warning("progress")
    finally:
        logger.removeHandler(handler)
    assert kept == [
        "Task run failed with exception: RuntimeError('a bug')",
        "Finished in state Failed('Task run encountered an exception RuntimeError: a bug')",
        "progress",
    ]


def test_in_a_served_run_a_user_error_is_one_line_and_progress_bars_are_log_lines(monkeypatch, caplog):
    import io
    import logging

    from flows import prefect_env
    from pipeline import bars
    from pipeline.config import ConfigError

    def record(message, error):
        return logging.LogRecord(
            "prefect.flow_runs", logging.ERROR, __file__, 1, message, (), (type(error), error, None)
        )

    one_line = prefect_env._OneLineInServedRuns()
    wrong = ConfigError("field `x`: wrong")
    user, engine, bug = (record(f"Encountered exception during execution: {wrong!r}", wrong),
                         record("Engine execution exited with unexpected exception", ConfigError("field `x`")),
                         record("Encountered exception during execution", RuntimeError("a bug")))  # fmt: skip
    assert one_line.filter(user) and user.exc_info is None  # its text, not its traceback
    assert user.getMessage() == "Encountered exception during execution: ConfigError: field `x`: wrong"
    task = logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "Task run failed with %s: %r",
                             ("exception", wrong), (ConfigError, wrong, None))  # fmt: skip
    assert (
        one_line.filter(task)
        and task.getMessage() == "Task run failed with exception: ConfigError: field `x`: wrong"
    )
    assert not one_line.filter(engine)  # the engine's repeat of the same error is dropped
    from pipeline.stop import Interrupted

    stopped = Interrupted()  # its message starts with its name: not "Interrupted: interrupted: ..."
    task = logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "Task run failed with exception: %r",
                             (stopped,), (Interrupted, stopped, None))  # fmt: skip
    assert one_line.filter(task) and task.getMessage().startswith(
        "Task run failed with exception: Interrupted: finished shards"
    )
    assert one_line.filter(bug) and bug.exc_info is not None  # reconlab's own faults keep their traceback

    monkeypatch.setenv("RECONLAB_PROGRESS_LOG_S", "30")
    with caplog.at_level(logging.INFO, logger="reconlab.progress"):
        with bars.bar(total=3, desc="encode x", unit="img") as bar:
            bar.update(3)
        with bars.bar(total=3, desc="silent", disable=True) as bar:
            bar.update(3)
    lines = [r.getMessage() for r in caplog.records if r.name == "reconlab.progress"]
    assert lines and lines[-1].startswith("encode x: 100%") and "3/3" in lines[-1], lines
    assert not any("silent" in line for line in lines)
    monkeypatch.delenv("RECONLAB_PROGRESS_LOG_S")  # a terminal's bar otherwise, no log records
    caplog.clear()
    terminal = io.StringIO()
    with (
        caplog.at_level(logging.INFO, logger="reconlab.progress"),
        bars.bar(total=1, desc="on a terminal", file=terminal) as bar,
    ):
        bar.update(1)
    assert not caplog.records and "on a terminal: 100%" in terminal.getvalue()


def test_a_deployment_made_without_reconlab_dir_says_so():
    from flows import tasks
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"config file not found .*RECONLAB_DIR, which was not set"):
        tasks.run_config(
            "/configs/demo.yaml"
        )  # prefect.yaml's "{{ $RECONLAB_DIR }}/configs/demo.yaml", unset


def test_version_prints_the_installed_version():
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"reconlab {version('reconlab')}"


def test_prefect_yaml_deploys_every_stage_flow_with_its_parameters():
    import importlib

    import yaml

    from flows.deployments import STAGE_FLOWS

    spec = yaml.safe_load((Path(__file__).resolve().parent.parent / "prefect.yaml").read_text())
    flows = {}
    for d in spec["deployments"]:
        path, name = d["entrypoint"].split(":")
        module = path.removesuffix(".py").replace("/", ".")
        flows[d["name"]] = getattr(importlib.import_module(module), name)
        assert d["concurrency_limit"]["limit"] == 1 and d["work_pool"]["name"].startswith("reconlab-")
        assert set(d["parameters"]) <= set(flows[d["name"]].parameters.properties)
    assert {f.name for f in flows.values()} == {f.name for f in STAGE_FLOWS.values()}


def test_only_transient_faults_are_retried():
    import errno

    from prefect.states import Completed, Failed

    from flows.tasks import transient
    from pipeline.config import ConfigError
    from storage import StoreLocked

    def failed(error):
        return Failed(data=error)

    assert transient(None, None, failed(OSError(errno.EIO, "Input/output error")))
    assert transient(None, None, failed(RuntimeError("CUDA error: unspecified launch failure")))
    for user_error in (
        ConfigError("bad field"),
        StoreLocked("held"),
        OSError(errno.ENOSPC, "No space", "/x"),
    ):
        assert not transient(None, None, failed(user_error))
    assert not transient(None, None, Completed(data=1))


@pytest.mark.slow
@pytest.mark.parametrize("task_runner", ["threads", "dask"])
def test_parallel_tasks_encode_several_stores_at_once_through_the_flow(
    write_run_config, tmp_path, task_runner
):
    """orchestration.task_runner: threads of the flow's process, or prefect-dask's runner on a local cluster of
    worker processes."""
    from storage import open_store

    config = write_run_config(
        encoders=["tiny-vit-64", "tiny-vit-112"], orchestration={"parallel_tasks": 2, "task_runner": task_runner},
        operators={"pairs": []}, train={"train_split": "val", "val_split": "val"},
    )  # fmt: skip
    result = runner.invoke(app, ["encode", "--config", str(config), "--no-progress"])
    assert result.exit_code == 0, result.output
    stores = sorted((tmp_path / "stores").glob("*.zarr"))
    assert len(stores) == 2 and all(open_store(p).complete for p in stores)
