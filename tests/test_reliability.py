"""Every user mistake and environment fault ends in one line (exit 2, no traceback, nothing written outside the
configured roots); what a run needs is checked before its first expensive step; a killed run leaves nothing
running."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app

ROOT = Path(__file__).resolve().parent.parent


def _live_started_by(home: Path) -> list[str]:
    """Processes a CLI run with RECONLAB_HOME=home started, still running: they all inherit its environment, also
    those in sessions of their own (Prefect's temporary server). Zombies waiting for init hold nothing."""
    live, marker = [], f"RECONLAB_HOME={home}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in environ and state != "Z":
                live.append(entry.name)
    return live


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_a_sigkilled_encode_leaves_no_process_running(write_run_config, tmp_path):
    config = write_run_config(encoders=["tiny-vit-112"], encode={"batch_size": 4, "num_workers": 2})
    env = {**os.environ, "RECONLAB_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_HOME", None)  # its own temporary Prefect server, as a user's run has
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "encode", "-c", str(config), "--no-progress"], cwd=ROOT, env=env,
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "stores").glob("*/features/c")):
        assert proc.poll() is None, "encode ended before it could be killed"
        time.sleep(0.2)
    assert len(_live_started_by(tmp_path / "home")) >= 4, "the server, fork server and workers"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and _live_started_by(tmp_path / "home"):
        time.sleep(0.2)
    assert not _live_started_by(tmp_path / "home")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
@pytest.mark.parametrize("how", ["Ctrl-C to the terminal's process group", "SIGTERM to the command"])
def test_an_interrupted_training_stops_at_once_in_one_line_and_leaves_nothing_running(
    write_run_config, tmp_path, how
):
    config = write_run_config(
        subset={"max_images": 8},
        train={"output_root": str(tmp_path / "train"), "epochs": 500, "batch_size": 4, "n_val_images": 4,
               "n_sample_images": 1, "shuffle_buffer_images": 8, "val_every_steps": 10000},
        splits=["train", "val"],
    )  # fmt: skip
    env = {**os.environ, "RECONLAB_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_HOME", None)  # its own temporary Prefect server, which the terminal's Ctrl-C reaches too
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "train", "-c", str(config), "--no-progress"], cwd=ROOT, env=env,
        start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "train").glob("*/checkpoints/epoch-*.json"))) < 2:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    if how.startswith("Ctrl-C"):
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        output, _ = proc.communicate(
            timeout=15
        )  # it trained on before: for minutes, or until the training ended
    except subprocess.TimeoutExpired as e:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"still running 15 s after {how}: {proc.communicate()[0]}") from e
    assert proc.returncode == 130, output
    assert "finished shards, epochs and fits are kept; run the same command to resume" in output
    # at the safe point: Prefect's engine sends a SIGTERM it caught to the process again, which is no second signal
    assert "stopping at the next safe point" in output and "stopped now" not in output, output
    assert "Traceback" not in output and "ERROR" not in output, output
    with sqlite3.connect(tmp_path / "home" / "prefect" / "prefect.db") as db:  # the temporary server's record
        # A Ctrl-C left it RUNNING (the server stopped first); Prefect's engine reads a SIGTERM as a crash.
        ended = "FAILED" if how.startswith("Ctrl-C") else "CRASHED"
        assert db.execute("SELECT state_type FROM flow_run").fetchall() == [(ended,)]
    deadline = time.time() + 10
    while time.time() < deadline and _live_started_by(tmp_path / "home"):
        time.sleep(0.2)
    assert not _live_started_by(tmp_path / "home")


WATCHED = """
import os, subprocess, sys, time
from flows import reaper
reaper.start()
takes_its_time = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: (time.sleep(4), open(sys.argv[1], 'w').close(), sys.exit(0))); time.sleep(60)"
subprocess.Popen([sys.executable, "-c", takes_its_time, sys.argv[1] + "/flow-run-recorded"],
                 env={**os.environ, "PREFECT__FLOW_RUN_ID": "x"})
subprocess.Popen([sys.executable, "-c", takes_its_time, sys.argv[1] + "/helper-recorded"])
time.sleep(1.5)  # the reaper has noted both
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_the_reaper_lets_a_flow_run_of_a_killed_serve_record_its_end_and_kills_the_rest(tmp_path):
    """A flow run needs seconds to stop at its safe point and record it; killed after the 3 s every other process
    gets, it stayed Running on the server for good."""
    env = {**os.environ, "RECONLAB_HOME": str(tmp_path / "home")}
    watched = subprocess.Popen([sys.executable, "-c", WATCHED, str(tmp_path)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert watched.stdout.readline() == "ready\n"
    watched.kill()
    watched.wait()
    deadline = time.time() + 20
    while time.time() < deadline and _live_started_by(tmp_path / "home"):
        time.sleep(0.2)
    assert not _live_started_by(tmp_path / "home")
    assert (tmp_path / "flow-run-recorded").exists() and not (tmp_path / "helper-recorded").exists()


SERVED_RUN = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as Prefect's runner starts it (pytest's may be ignored)
from flows import interrupts
from pipeline import stop
interrupts.in_a_served_run()
class TerminationSignal(BaseException):
    pass
if len(sys.argv) > 2:  # as Prefect's flow engine does during a run: SIGTERM raises in the main thread
    def prefects(signum, frame):
        raise TerminationSignal
    signal.signal(signal.SIGTERM, prefects)
deadline = time.time() + 20
try:
    print("ready", flush=True)  # inside the try: a signal sent at once must land in it
    while not stop.requested() and time.time() < deadline:
        time.sleep(0.05)
except TerminationSignal:  # the engine then waits for the running task: the stage must stop too
    print("Prefect's handler ran", flush=True)
    while not stop.requested() and time.time() < deadline:
        time.sleep(0.05)
print("stop requested" if stop.requested() else "not stopped", flush=True)
time.sleep(float(sys.argv[1]))  # the stage reaching its safe point and the run recording Failed
os._exit(130)
"""

SERVER = """
import os, signal, subprocess, sys, time
from flows import interrupts
with interrupts.flow_runs_stop_before_serving_ends() as stop_serving:
    signal.signal(signal.SIGTERM, lambda signum, frame: stop_serving(signum))  # as reconlab's Prefect runner does
    run = subprocess.Popen([sys.executable, "-c", sys.argv[1], "1.5"], env={**os.environ, "PREFECT__FLOW_RUN_ID": "x"},
                           stdout=subprocess.PIPE, text=True)
    assert run.stdout.readline() == "ready\\n"
    print("serving", flush=True)
    try:
        time.sleep(30)
    except KeyboardInterrupt:
        print(f"serving ended, the run {'running' if run.poll() is None else 'ended'}: {run.stdout.read()!r}", flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
@pytest.mark.parametrize("how", ["Ctrl-C to the terminal", "SIGTERM to the serving process alone"])
def test_stopping_reconlab_serve_lets_its_flow_runs_stop_and_record_it_before_serving_ends(how):
    """Prefect's runner kills its flow runs as it shuts down; on a Ctrl-C to the terminal (SIGINT to the serving
    process and its runs), or a SIGTERM to the serving process (`kill`, `docker stop`), serving now ends only
    once the runs have stopped at a safe point (with a real server: tests/test_prefect_server.py)."""
    serve = subprocess.Popen([sys.executable, "-c", SERVER, SERVED_RUN], cwd=ROOT, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    assert serve.stdout.readline() == "serving\n"
    start = time.monotonic()
    if how.startswith("Ctrl-C"):
        os.killpg(serve.pid, signal.SIGINT)
    else:
        serve.send_signal(signal.SIGTERM)
    output, _ = serve.communicate(timeout=30)
    assert time.monotonic() - start > 1.5, output  # it waited for the run
    assert "serving ended, the run ended: 'stop requested\\n'" in output, output
    assert "the running flow runs stop at their next safe point first" in output


def test_only_a_flow_run_started_by_prefect_takes_over_sigint_and_leaves_sigterm_to_prefect():
    def run(env: dict, sig: int, *prefect_handler: str) -> tuple[int, str]:
        proc = subprocess.Popen([sys.executable, "-c", SERVED_RUN, "0.5", *prefect_handler], cwd=ROOT,
                                env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)  # fmt: skip
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=30)
        return proc.returncode, output

    code, output = run({"PREFECT__FLOW_RUN_ID": "x"}, signal.SIGINT)
    assert code == 130 and "stop requested\n" in output and "stopping at the next safe point" in output, (
        output
    )
    code, output = run({}, signal.SIGINT)  # not a served run: Python's own KeyboardInterrupt
    assert code == -signal.SIGINT and "KeyboardInterrupt" in output
    assert run({"PREFECT__FLOW_RUN_ID": "x"}, signal.SIGTERM)[0] == -signal.SIGTERM  # Prefect's to handle
    # With Prefect's handler in place (a flow run under way), its handler runs and the stage is asked to stop:
    # Prefect records the run only once the running task returns, and the stage went on to its end.
    code, output = run({"PREFECT__FLOW_RUN_ID": "x"}, signal.SIGTERM, "prefect's handler")
    assert "Prefect's handler ran\n" in output and "stop requested\n" in output, output
    assert "SIGTERM: stopping at the next safe point" in output


# -- the bad-input matrix: one line, exit 2, no traceback, nothing written ----------------------------------------

runner = CliRunner()
GOOD_IMAGES = [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}]


def _coco(tmp_path, annotations) -> dict:
    images = tmp_path / "coco" / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (48, 40), (200, 30, 30)).save(images / name)
    path = tmp_path / "coco" / "captions.json"
    path.write_text(annotations if isinstance(annotations, str) else json.dumps(annotations))
    split = {"images_dir": "images", "annotations": "captions.json"}
    return {
        "name": "mini",
        "kind": "coco",
        "root": str(tmp_path / "coco"),
        "splits": {"train": split, "val": split},
    }


def _roots(tmp_path) -> dict:
    return {
        "train": {"output_root": str(tmp_path / "out" / "train")},
        "operators": {"output_root": str(tmp_path / "out" / "operators")},
        "evaluate": {"output_root": str(tmp_path / "out" / "evaluate"), "judges": ["tiny-judge"]},
    }


def _write_raw(tmp_path, data: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _base(tmp_path, **overrides) -> dict:
    dataset = overrides.pop("dataset", None) or _coco(tmp_path, {"images": GOOD_IMAGES})
    data = {"store_root": str(tmp_path / "stores"), "dataset": dataset, "splits": ["val"],
            "encoders": ["tiny-vit-64"], **_roots(tmp_path)}  # fmt: skip
    data.update(overrides)
    return data


def _assert_one_line_failure(result, *fragments: str) -> None:
    out = result.output
    assert result.exit_code == 2, out
    assert "Traceback" not in out and len(out) < 2000, out
    for fragment in fragments:
        assert fragment in out, out


COCO_CASES = {
    "not json": ("{images: [", "not valid JSON"),
    "a json list": ("[1, 2]", "got a JSON list"),
    "no images key": ({"annotations": []}, "no 'images' list"),
    "images as a mapping": ({"images": {}}, "'images' is a dict, not a list"),
    "image without file_name": ({"images": [{"id": 1}]}, "images[0] has no file_name"),
    "image without id": ({"images": [{"file_name": "a.png"}]}, "images[0] has no id"),
    "non-integer id": ({"images": [{"id": "7", "file_name": "a.png"}]}, "is not an integer"),
    "id beyond int64": ({"images": [{"id": 2**63 + 5, "file_name": "a.png"}]}, "outside the 64-bit integer range"),
    "duplicate ids": ({"images": [{"id": 3, "file_name": "a.png"}, {"id": 3, "file_name": "b.png"}]},
                      "duplicate image ids [3]"),
    "empty split": ({"images": []}, "has no images"),
}  # fmt: skip


@pytest.mark.parametrize("case", COCO_CASES, ids=list(COCO_CASES))
def test_broken_coco_annotations_end_in_one_line_naming_the_file(tmp_path, case):
    annotations, fragment = COCO_CASES[case]
    config = _write_raw(tmp_path, _base(tmp_path, dataset=_coco(tmp_path, annotations)))
    _assert_one_line_failure(runner.invoke(app, ["plan", "-c", str(config)]), "captions.json", fragment)
    assert not (tmp_path / "stores").exists()


def test_a_file_name_that_names_a_folder_is_a_failed_image_not_a_failed_run(tmp_path):
    from storage import open_store

    annotations = {"images": [*GOOD_IMAGES, {"id": 3, "file_name": "sub"}]}
    config = _write_raw(tmp_path, _base(tmp_path, dataset=_coco(tmp_path, annotations)))
    (tmp_path / "coco" / "images" / "sub").mkdir()

    from pipeline import plan
    from pipeline.config_files import load_run_config
    from pipeline.stages import encode

    run = plan.build(load_run_config(config), config)
    (job,) = [j for j in run.encode.values() if j.split == "val" and j.transform.name == "identity"]
    store = open_store(encode.run(job, progress=False).store_path)  # listing and fingerprinting it: no crash
    assert [(f["image_id"], f["reason"]) for f in store.attrs["failures"]] == [(3, "not a file (a folder)")]


def test_a_captions_file_with_categories_and_annotations_without_category_id_is_read(tmp_path):
    annotations = {"images": GOOD_IMAGES, "categories": [],
                   "annotations": [{"id": 1, "image_id": 1, "caption": "red"}, {"image_id": 2, "caption": "red too"}]}  # fmt: skip
    from pipeline.config import DatasetSpec
    from pipeline.data.datasets import list_images

    records = list_images(DatasetSpec.model_validate(_coco(tmp_path, annotations)), "val")
    assert [r.captions for r in records] == [("red",), ("red too",)]


def test_plan_arguments_that_would_be_ignored_are_refused_in_one_line(tmp_path):
    config = _write_raw(tmp_path, _base(tmp_path))
    estimate = ["plan", "-c", str(config), "--estimate"]
    twice = runner.invoke(app, [*estimate, "--images", "val=5", "--images", "val=7"])
    assert twice.exit_code == 2 and "split 'val' twice" in twice.output, twice.output
    unused = runner.invoke(
        app, [*estimate, "--images", "val=5", "--images", "train=5", "--images", "nosplit=9"]
    )
    assert unused.exit_code == 2 and "['nosplit'] that this run does" in unused.output, unused.output
    _assert_one_line_failure(runner.invoke(app, ["plan", "-c", str(tmp_path)]), "a folder, not a config file")
    missing_split = _write_raw(tmp_path, _base(tmp_path, splits=["val", "test"]))
    _assert_one_line_failure(runner.invoke(app, ["plan", "-c", str(missing_split)]), "no split 'test'",
                             "add it to dataset.splits")  # fmt: skip
    no_root = _base(tmp_path)
    no_root["dataset"]["root"] = str(tmp_path / "nowhere")
    _assert_one_line_failure(runner.invoke(app, ["plan", "-c", str(_write_raw(tmp_path, no_root))]),
                             "run.yaml: dataset.root", "nowhere (dataset 'mini') is not a folder here")  # fmt: skip


CONFIG_CASES = {
    "dataset name with a path": (lambda d: d["dataset"].update(name="../evil"), "dataset.name", "folder names"),
    "split name with a slash": (lambda d: d.update(splits=["a/b"]), "splits.0", "folder names"),
    "over-long dataset name": (lambda d: d["dataset"].update(name="x" * 300), "dataset.name", "1-64 letters"),
    "unknown judge": (lambda d: d["evaluate"].update(judges=["no-such-judge"]), "evaluate.judges", "no-such-judge"),
    "unknown fit": (lambda d: d["operators"].update(fits=["svd"]), "operators.fits.0", "least_squares"),
    "unknown encoder": (lambda d: d.update(encoders=["no-such-encoder"]), "encoders", "known: "),
}  # fmt: skip


@pytest.mark.parametrize("case", CONFIG_CASES, ids=list(CONFIG_CASES))
def test_bad_names_and_unknown_references_fail_before_any_work(tmp_path, case):
    change, *fragments = CONFIG_CASES[case]
    data = _base(tmp_path, splits=["train", "val"])
    change(data)
    config = _write_raw(tmp_path, data)
    _assert_one_line_failure(runner.invoke(app, ["plan", "-c", str(config)]), *fragments)
    assert not (tmp_path / "stores").exists() and not (tmp_path / "out").exists()


def test_filters_that_select_nothing_are_errors(tmp_path):
    data = _base(tmp_path, splits=["train", "val"])
    data["operators"]["n_fit_images"] = 1
    config = _write_raw(tmp_path, data)
    _assert_one_line_failure(runner.invoke(app, ["operators", "-c", str(config), "-t", "swap_gb"]),
                             "swap_gb matches no operator pair", "swap_rb")  # fmt: skip
    # a typo: the config's encoders listed, not every spec reconlab ships
    _assert_one_line_failure(runner.invoke(app, ["encode", "-c", str(config), "-e", "tiny-vit-65"]),
                             "field `--encoder / encoder_names`: 'tiny-vit-65' is not an encoder of",
                             "(it has tiny-vit-64)")  # fmt: skip
    # a known encoder the config does not have: a filter, not an addition
    _assert_one_line_failure(runner.invoke(app, ["encode", "-c", str(config), "-e", "tiny-vit-112"]),
                             "'tiny-vit-112' is not an encoder of", "(it has tiny-vit-64)")  # fmt: skip
    assert not (tmp_path / "stores").exists()


def test_duplicate_yaml_keys_and_alias_bombs_end_in_short_messages(tmp_path):
    config = tmp_path / "dup.yaml"
    config.write_text(f"store_root: {tmp_path}/a\nstore_root: {tmp_path}/b\n")
    _assert_one_line_failure(
        runner.invoke(app, ["plan", "-c", str(config)]), "line 2", "duplicate key 'store_root'"
    )
    rows = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    rows += [f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefg", "bcdefgh", strict=True)]
    config.write_text("\n".join(rows) + "\nstore_root: [*h, *h, *h, *h, *h, *h, *h, *h, *h]\n")
    _assert_one_line_failure(runner.invoke(app, ["plan", "-c", str(config)]), "store_root")


def test_an_unwritable_store_root_fails_naming_it_before_encoding(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = _write_raw(tmp_path, _base(tmp_path, store_root=str(blocker / "stores")))
    _assert_one_line_failure(
        runner.invoke(app, ["encode", "-c", str(config)]),
        "store_root",
        "cannot write there (a file is in the way: it must be a folder)",
    )
    from pipeline import checks
    from pipeline.config import ConfigError

    # what `plan` (which writes nothing) checks to say why `run` would stop: the same verdict, no folder made
    with pytest.raises(ConfigError, match="a file is in the way: it must be a folder"):
        checks._check_writable("store_root", blocker / "stores", make=False)
    checks._check_writable("train.output_root", tmp_path / "new" / "runs", make=False)
    assert not (tmp_path / "new").exists()


def test_a_read_only_store_root_serves_its_finished_stores_and_is_refused_only_for_new_ones(
    write_run_config, monkeypatch
):
    import shutil

    from pipeline import checks
    from pipeline.config import ConfigError

    config = write_run_config()
    assert runner.invoke(app, ["encode", "-c", str(config), "--no-progress"]).exit_code == 0
    real_check = checks._check_writable

    def read_only(field_name, root, make=True):  # chmod does not stop root, who may run the tests
        if field_name == "store_root":
            raise ConfigError(f"store_root {root}: cannot write there (Read-only file system)")
        real_check(field_name, root, make)

    monkeypatch.setattr(checks, "_check_writable", read_only)
    assert runner.invoke(app, ["encode", "-c", str(config), "--no-progress"]).exit_code == 0
    shutil.rmtree(next((config.parent / "stores").glob("*.zarr")))
    _assert_one_line_failure(
        runner.invoke(app, ["encode", "-c", str(config), "--no-progress"]), "store_root", "cannot write there"
    )


def test_a_run_waiting_for_another_runs_lock_says_so_on_the_terminal(write_run_config, capfd):
    import contextlib

    from pipeline.artifacts import WriteLock
    from pipeline.config_files import load_run_config
    from pipeline.plan import build

    config = write_run_config(orchestration={"lock_wait_s": 1})
    with contextlib.ExitStack() as held:
        for store in build(load_run_config(config), config).encode:  # another run writing them
            held.enter_context(WriteLock(store))
        result = runner.invoke(app, ["encode", "-c", str(config), "--no-progress"])
    # on the terminal itself: a print in a flow became a log record that the CLI's Prefect level hid
    waited = [line for line in capfd.readouterr().err.splitlines() if line.startswith("waiting: ")]
    assert waited and waited[0].startswith(f"waiting: another run (pid {os.getpid()}) is writing "), waited
    assert result.exit_code == 2 and "wait for it to finish or stop it" in result.output


def test_missing_judge_weights_fail_before_any_encoding(tmp_path):
    judge = {"name": "judge-on-disk", "backend": "timm", "model_id": "vit_tiny_patch16_224", "resolution": 64,
             "patch_size": 16, "keep_head": True, "preprocessing_source": "timm_pretrained_cfg",
             "weights": str(tmp_path / "no-such-weights.safetensors")}  # fmt: skip
    (tmp_path / "encoders").mkdir()
    (tmp_path / "encoders" / "judge-on-disk.yaml").write_text(yaml.safe_dump(judge))
    data = _base(tmp_path, encoders=["tiny-vit-64", "tiny-vit-112"])
    data["evaluate"]["judges"] = ["judge-on-disk"]
    config = _write_raw(tmp_path, data)
    _assert_one_line_failure(runner.invoke(app, ["evaluate", "-c", str(config)]),
                             "judge-on-disk", "no-such-weights.safetensors")  # fmt: skip
    assert not (tmp_path / "stores").exists()


@pytest.mark.parametrize(
    "change, fragments",
    [
        (
            lambda d: d["evaluate"].update(split="train"),
            ("evaluate.split 'train'", "trains the reconstructors"),
        ),
        (lambda d: d["operators"].update(split="train"), ("operators.split 'train'",)),
        (
            lambda d: d["operators"].update(split="test", n_fit_images=2),
            ("n_fit_images 2 leaves no test images",),
        ),
    ],
    ids=["evaluate on training images", "operators on training images", "too few held-out images"],
)
def test_held_out_splits_and_sizes_are_checked_before_encoding(tmp_path, change, fragments):
    data = _base(tmp_path, encoders=["tiny-vit-64", "tiny-vit-112"], splits=["train", "val", "test"])
    data["dataset"]["splits"]["test"] = {"images_dir": "images", "annotations": "captions.json"}
    change(data)
    config = _write_raw(tmp_path, data)
    _assert_one_line_failure(runner.invoke(app, ["run", "-c", str(config)]), *fragments)
    assert not (tmp_path / "stores").exists()


def test_a_held_out_split_listing_a_training_file_under_another_id_is_refused_before_encoding(tmp_path):
    data = _base(tmp_path, encoders=["tiny-vit-64", "tiny-vit-112"], splits=["train", "val"])
    coco = Path(data["dataset"]["root"])
    (coco / "val.json").write_text(json.dumps({"images": [{"id": 11, "file_name": "b.png"}]}))
    (coco / "train.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"},
                                                            {"id": 2, "file_name": "b.png"}]}))  # fmt: skip
    data["dataset"]["splits"] = {split: {"images_dir": "images", "annotations": f"{split}.json"}
                                 for split in ("train", "val")}  # fmt: skip
    config = _write_raw(tmp_path, data)
    _assert_one_line_failure(runner.invoke(app, ["evaluate", "-c", str(config)]),
                             "evaluate.split 'val': 1 of its image files are also in split 'train'", "b.png")  # fmt: skip
    assert not (tmp_path / "stores").exists()


# -- faults inside a stage: recorded or resumable, never lost ------------------------------------------------------


def test_an_image_path_leading_out_of_its_folder_is_refused_and_recorded(tmp_path):
    from pipeline.config import DatasetSpec, EncodeOptions, StoreOptions, SubsetSpec, TransformSpec
    from pipeline.config_files import resolve_encoder
    from pipeline.jobs import EncodeJob
    from pipeline.stages import encode
    from storage import open_store

    dataset = _coco(tmp_path, {"images": [*GOOD_IMAGES, {"id": 3, "file_name": "../outside.png"},
                                          {"id": 4, "file_name": str(tmp_path / "coco" / "images" / "a.png")},
                                          {"id": 5, "file_name": "link.png"}]})  # fmt: skip
    Image.new("RGB", (48, 40)).save(tmp_path / "coco" / "outside.png")
    (tmp_path / "coco" / "images" / "link.png").symlink_to(tmp_path / "coco" / "outside.png")
    job = EncodeJob(tmp_path / "stores", DatasetSpec.model_validate(dataset), "val", SubsetSpec(),
                    resolve_encoder("tiny-vit-64"), TransformSpec(), StoreOptions(shard_images=4),
                    EncodeOptions(batch_size=4, num_workers=0))  # fmt: skip
    result = encode.run(job, progress=False)
    assert (result.n_encoded, result.n_failed) == (2, 3)
    failures = {f["image_id"]: f["reason"] for f in open_store(result.store_path).attrs["failures"]}
    assert set(failures) == {3, 4, 5} and all(
        "leads outside the images folder" in r for r in failures.values()
    )


def test_disk_full_mid_encode_is_one_line_and_the_rerun_resumes(make_job, monkeypatch):
    import errno

    from flows.errors import one_line
    from pipeline.config import StoreOptions, SubsetSpec
    from pipeline.stages import encode
    from storage import FeatureStore, open_store

    job = make_job(subset=SubsetSpec(max_images=12), store=StoreOptions(shard_images=4))
    real_write = FeatureStore.write_shard

    def full_disk(self, shard, *args, **kwargs):
        if shard == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "features"))
        return real_write(self, shard, *args, **kwargs)

    monkeypatch.setattr(FeatureStore, "write_shard", full_disk)
    with pytest.raises(OSError) as caught:
        encode.run(job, progress=False)
    message = one_line(caught.value)
    assert "No space left on device" in message and "features" in message and "resume" in message
    path = encode.plan(job)[2]
    assert open_store(path, require_complete=False).shard_done().tolist() == [True, False, False]
    monkeypatch.setattr(FeatureStore, "write_shard", real_write)
    again = encode.run(job, progress=False)
    assert not again.already_complete and again.n_encoded == 12 and open_store(path).complete


def test_a_store_removed_under_its_writer_stops_in_one_line_and_the_rerun_starts_it_anew(
    make_job, monkeypatch
):
    import shutil

    from pipeline.config import StoreOptions, SubsetSpec
    from pipeline.stages import encode
    from storage import FeatureStore, StoreError, open_store

    job = make_job(subset=SubsetSpec(max_images=12), store=StoreOptions(shard_images=4))
    real_write = FeatureStore.write_shard

    def removed(self, shard, *args, **kwargs):
        if shard == 1:
            shutil.rmtree(self.path)  # a user's `rm -rf` while the run writes
        return real_write(self, shard, *args, **kwargs)

    monkeypatch.setattr(FeatureStore, "write_shard", removed)
    with pytest.raises(StoreError, match="removed while it was being written; run the same command again"):
        encode.run(job, progress=False)
    path = encode.plan(job)[2]
    assert not path.exists()  # no folder of loose shards made again
    path.mkdir()  # what a removal racing a writer can leave: folders without the store's zarr.json
    (path / "features").mkdir()
    monkeypatch.setattr(FeatureStore, "write_shard", real_write)
    again = encode.run(job, progress=False)
    assert again.n_encoded == 12 and open_store(path).complete


def test_a_failure_of_prefects_local_server_names_its_database(monkeypatch, tmp_path):
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    from flows.errors import one_line

    request = httpx.Request("POST", "http://127.0.0.1:8401/api/flow_runs/")
    failed = httpx.HTTPStatusError("500", request=request, response=httpx.Response(500, request=request))
    error = PrefectHTTPStatusError.from_httpx_error(failed)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    message = one_line(error)  # under a file size limit or on a full disk: a bare HTTP 500 before
    assert message.startswith(
        f"{tmp_path / 'prefect' / 'prefect.db'}: Prefect's local server failed (HTTP 500)"
    )
    assert "ulimit -f" in message and "resume" in message
    monkeypatch.setenv(
        "PREFECT_API_URL", "http://my-server:4200/api"
    )  # a configured server's error is its own
    assert one_line(error) is None


def test_a_file_size_limit_hit_mid_write_is_one_line_naming_the_file(make_job, monkeypatch):
    import errno
    import os

    from flows.errors import one_line
    from pipeline.config import SubsetSpec
    from pipeline.stages import encode

    def too_large(fd, buffers):
        raise OSError(errno.EFBIG, "File too large")  # writev names no file

    monkeypatch.setattr(os, "writev", too_large)
    with pytest.raises(OSError) as caught:
        encode.run(make_job(subset=SubsetSpec(max_images=4)), progress=False)
    message = one_line(caught.value)
    assert message.startswith(str(encode.plan(make_job(subset=SubsetSpec(max_images=4)))[2]))
    assert "File too large" in message and "ulimit -f" in message and "\n" not in message


def test_a_partial_store_an_older_version_left_resumes_to_the_same_content(make_job, monkeypatch, tmp_path):
    import json
    import shutil

    from pipeline.config import StoreOptions, SubsetSpec
    from pipeline.stages import encode
    from storage import FeatureStore, open_store
    from storage.format import RECORDS_FOLDER

    job = make_job(subset=SubsetSpec(max_images=12), store=StoreOptions(shard_images=4))
    real_write = FeatureStore.write_shard

    def stop_at_shard_2(self, shard, *args, **kwargs):
        if shard == 2:
            raise KeyboardInterrupt
        return real_write(self, shard, *args, **kwargs)

    monkeypatch.setattr(FeatureStore, "write_shard", stop_at_shard_2)
    with pytest.raises(KeyboardInterrupt):
        encode.run(job, progress=False)
    monkeypatch.setattr(FeatureStore, "write_shard", real_write)
    # before 2026-11-27 the done shards' records were in the `shards` attribute, not in groups of their own
    path = encode.plan(job)[2]
    partial = open_store(path, require_complete=False, mode="r+")
    records = {
        f.parent.name: json.loads(f.read_text())["attributes"]
        for f in (path / RECORDS_FOLDER).glob("*/zarr.json")
    }
    assert sorted(records) == ["0", "1"]
    partial.group.attrs["shards"] = records
    shutil.rmtree(path / RECORDS_FOLDER)

    resumed = open_store(encode.run(job, progress=False).store_path)
    fresh = open_store(encode.run(make_job(store_root=tmp_path / "fresh", subset=SubsetSpec(max_images=12),
                                           store=StoreOptions(shard_images=4)), progress=False).store_path)  # fmt: skip
    assert sorted(resumed.attrs["shards"], key=int) == ["0", "1", "2"]
    assert resumed.attrs["content_sha256"] == fresh.attrs["content_sha256"]


def test_not_enough_free_space_is_refused_before_encoding(make_job, monkeypatch):
    import shutil
    from collections import namedtuple

    from pipeline.config import SubsetSpec
    from pipeline.stages import encode
    from storage import StoreError, open_store

    job = make_job(subset=SubsetSpec(max_images=8))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(StoreError, match=r"8 images still to encode need about [\d.]+[kM]B, 1.00kB are free"):
        encode.run(job, progress=False)
    assert not open_store(encode.plan(job)[2], require_complete=False).shard_done().any()


def _header(tmp_path, **model) -> Path:
    from pipeline.config import ReconstructorConfig

    geometry = {**ReconstructorConfig().model_dump(mode="json"), "in_dim": 192, "grid_hw": [4, 4], "patch_size": 16,
                "out_size": 64, **model}  # fmt: skip
    path = tmp_path / "ckpt.json"
    path.write_text(json.dumps({"schema_version": 1, "model": geometry, "weights_sha256": "0" * 64}))
    return path


def test_a_checkpoint_header_asking_for_a_huge_model_is_refused_before_allocating(tmp_path):
    import resource

    from pipeline.models.checkpoints import CheckpointError, load_reconstructor

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match="out of bounds"):
        load_reconstructor(_header(tmp_path, depth=200_000))
    with pytest.raises(CheckpointError, match="out of bounds"):
        load_reconstructor(_header(tmp_path, in_dim=10**7))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing was built


def test_a_pickle_or_mismatched_weights_file_is_refused_with_a_message(tmp_path):
    import pickle

    import torch
    from safetensors.torch import save_file

    from pipeline.models.checkpoints import CheckpointError, load_reconstructor

    header = _header(tmp_path)
    header.with_suffix(".safetensors").write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    with pytest.raises(CheckpointError, match="not a safetensors file.*never loads pickles"):
        load_reconstructor(header)
    save_file({"proj.weight": torch.zeros(3, 3)}, str(header.with_suffix(".safetensors")))
    with pytest.raises(CheckpointError, match="tensors do not fit the model"):
        load_reconstructor(header)
    header.write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable checkpoint header"):
        load_reconstructor(header)
