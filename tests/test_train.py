"""Train stage: learning, resume-after-kill equivalence, checkpoints, mismatch errors, the reconstruct CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file
from typer.testing import CliRunner

from flows.cli import app
from pipeline.config import ReconstructorConfig, StoreOptions, SubsetSpec, TrainConfig
from pipeline.data.store_info import StoreInfo
from pipeline.models import checkpoints
from pipeline.models.checkpoints import load_reconstructor, reconstruct
from pipeline.models.reconstructor import Reconstructor
from pipeline.science import metrics
from pipeline.stages import encode, train
from storage import StoreError, open_store

FAST = dict(
    batch_size=4, lr=2e-3, val_every_steps=1000, n_val_images=8, n_sample_images=2, shuffle_buffer_images=8
)


@pytest.fixture
def tiny_store(make_job):
    """8 demo images through the 64 px tiny encoder, two shards."""
    job = make_job(subset=SubsetSpec(max_images=8), store=StoreOptions(shard_images=4))
    return encode.run(job, progress=False).store_path


def _cfg(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(output_root=tmp_path / "train", **{**FAST, **kw})


def test_overfitting_a_handful_of_images_beats_the_mean_image_baseline_by_far(tiny_store, tmp_path):
    result = train.run(
        train.TrainJob(tiny_store, tiny_store, _cfg(tmp_path, epochs=150, batch_size=8, lr=1e-3)),
        progress=False,
    )
    store = open_store(tiny_store)
    pixels01 = store.pixels()[store.valid()].astype(np.float32) / 255
    mean_image = np.broadcast_to(pixels01.mean(axis=0), pixels01.shape)
    baseline_db = float(metrics.psnr_db(pixels01, mean_image).mean())
    assert result.val_metrics["val_psnr_db"] > baseline_db + 5, (result.val_metrics, baseline_db)
    run_dir = result.run_dir
    assert (run_dir / "metrics.csv").read_text().count("\n") == 151
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "samples" / "step-0000150.png").stat().st_size > 1000
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("epoch-*.json")) == [
        "epoch-0148.json",
        "epoch-0149.json",
    ]


def test_rerunning_a_finished_training_returns_its_checkpoint_at_once(tiny_store, tmp_path):
    job = train.TrainJob(tiny_store, tiny_store, _cfg(tmp_path, epochs=1))
    first = train.run(job, progress=False)
    second = train.run(job, progress=False)
    assert second.already_complete and second.checkpoint == first.checkpoint


def test_tensorboard_gets_every_steps_own_loss_though_the_host_reads_them_in_groups(
    tiny_store, tmp_path, monkeypatch
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    read_at_once, seen = [], []
    real_step, real_read = train.train_step, train.StepScalars.read

    def step_and_remember(*args):
        loss = real_step(*args)
        seen.append(loss.item())  # what reading every step, as before, gave
        return loss

    def read(self):
        rows = real_read(self)
        read_at_once.append(len(rows))
        return rows

    monkeypatch.setattr(train, "train_step", step_and_remember)
    monkeypatch.setattr(train.StepScalars, "read", read)
    monkeypatch.setattr(train, "LOSS_READ_SECONDS", 3600.0)  # only at validation and epoch ends
    result = train.run(
        train.TrainJob(tiny_store, tiny_store, _cfg(tmp_path, epochs=3, val_every_steps=3)), progress=False
    )
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert logged == [(step, np.float32(v)) for step, v in enumerate(seen, start=1)]  # 2 steps per epoch
    assert [e.step for e in events.Scalars("train/lr")] == [1, 2, 3, 4, 5, 6]
    assert read_at_once == [2, 1, 1, 2]  # epoch 0's end, step 3 (validation), epoch 1's end, epoch 2's end


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_train_compile_on_cuda_learns_as_eager_does(tiny_store, tmp_path):
    # the whole train stage compiled, as `train.compile: true` runs it (benchmarks/gpu.py times the step alone);
    # on the CPU this path takes ~95 s of compiling, checked by hand: the same validation MSE to 4 digits
    runs = {
        compiled: train.run(train.TrainJob(tiny_store, tiny_store,
                                           _cfg(tmp_path / str(compiled), epochs=3, device="cuda", compile=compiled)),
                            progress=False)
        for compiled in (False, True)
    }  # fmt: skip
    assert runs[True].val_metrics["val_mse"] == pytest.approx(runs[False].val_metrics["val_mse"], rel=0.02)


_KILLABLE = textwrap.dedent(
    """
    import sys, json, torch
    from pathlib import Path
    from pipeline.stages import train
    from pipeline.config import TrainConfig
    args = json.loads(sys.argv[1])
    torch.set_num_threads(args["threads"])  # float sums depend on the thread count: match the test process
    cfg = TrainConfig.model_validate(args["cfg"])
    train.run(train.TrainJob(Path(args["store"]), Path(args["store"]), cfg), progress=False)
    """
)


@pytest.mark.slow
def test_a_killed_training_resumes_and_ends_bit_identical_to_an_uninterrupted_one(
    tiny_store, tmp_path, processes_with
):
    cfg = _cfg(tmp_path, epochs=6, keep_last=10)
    args = json.dumps(
        {"cfg": cfg.model_dump(mode="json"), "store": str(tiny_store), "threads": torch.get_num_threads()}
    )
    tag = f"RECONLAB_TEST_RUN={tmp_path.name}"  # inherited by all the run starts: its loader's fork server, worker
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), **dict([tag.split("=")])}
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, args], env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if list((tmp_path / "train").glob("*/checkpoints/epoch-0001.json")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait() == -signal.SIGKILL, "training ended before it could be killed"
    if sys.platform.startswith(
        "linux"
    ):  # nothing it started outlives it (no reaper here: a plain script's kill)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and processes_with(tag):
            time.sleep(0.2)
        assert not processes_with(tag)
    (run_dir,) = [p for p in (tmp_path / "train").iterdir() if p.is_dir()]
    assert not (run_dir / "result.json").exists()

    resumed = train.run(train.TrainJob(tiny_store, tiny_store, cfg), progress=False)
    reference = train.run(
        train.TrainJob(tiny_store, tiny_store, cfg.model_copy(update={"output_root": tmp_path / "ref"})),
        progress=False,
    )
    a = load_file(str(resumed.last_checkpoint.with_suffix(".safetensors")))
    b = load_file(str(reference.last_checkpoint.with_suffix(".safetensors")))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_round_trip_weights_optimizer_scheduler_and_rng(tmp_path):
    model = Reconstructor(ReconstructorConfig(depth=1), 32, (2, 2), 4, 8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=1e-3, total_steps=10, pct_start=0.3, cycle_momentum=False
    )
    for _ in range(3):
        model(torch.randn(2, 2, 2, 32)).square().mean().backward()
        opt.step()
        sched.step()
    header = {
        "model": {**model.cfg.model_dump(), "in_dim": 32, "grid_hw": [2, 2], "patch_size": 4, "out_size": 8}
    }
    path = checkpoints.save(tmp_path, "c", model, header, opt, sched)
    rng_before = torch.get_rng_state()
    torch.manual_seed(123)
    model2 = Reconstructor(ReconstructorConfig(depth=1), 32, (2, 2), 4, 8)
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.OneCycleLR(
        opt2, max_lr=1e-3, total_steps=10, pct_start=0.3, cycle_momentum=False
    )
    loaded = checkpoints.read_header(path)
    checkpoints.load_weights(loaded, model2)
    checkpoints.load_train_state(loaded, opt2, sched2)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True)
    )
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg_sq"], s2[i]["exp_avg_sq"]) for i in s1)
    assert sched2.get_last_lr() == sched.get_last_lr() and sched2.last_epoch == sched.last_epoch
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))


def test_a_checkpoint_from_another_encoder_is_refused_before_reconstructing(tiny_store, make_job, tmp_path):
    result = train.run(train.TrainJob(tiny_store, tiny_store, _cfg(tmp_path, epochs=1)), progress=False)
    other = encode.run(
        make_job(encoder="tiny-vit-112", subset=SubsetSpec(max_images=4)), progress=False
    ).store_path
    out = CliRunner().invoke(
        app,
        [
            "reconstruct",
            "--store",
            str(other),
            "--checkpoint",
            str(result.checkpoint),
            "--out",
            str(tmp_path / "png"),
        ],
    )
    assert (
        out.exit_code == 2
        and "trained on features of encoder 'tiny-vit-64'" in out.output
        and "grid_hw" in out.output
    )


def test_train_and_val_stores_of_different_encoders_are_refused(tiny_store, make_job, tmp_path):
    other = encode.run(
        make_job(encoder="tiny-vit-112", subset=SubsetSpec(max_images=4)), progress=False
    ).store_path
    with pytest.raises(StoreError, match="different encoders"):
        train.run(train.TrainJob(tiny_store, other, _cfg(tmp_path)), progress=False)


def test_an_incomplete_store_is_refused_before_training(tiny_store, tmp_path):
    open_store(tiny_store, mode="r+").reopen_shards([1])  # taken back as a writer does it
    with pytest.raises(StoreError, match="incomplete"):
        train.run(train.TrainJob(tiny_store, tiny_store, _cfg(tmp_path)), progress=False)


def test_a_store_without_encoded_images_is_refused(tiny_store, tmp_path):
    zarr.open_group(str(tiny_store), mode="r+").attrs["n_encoded"] = 0
    with pytest.raises(StoreError, match="no encoded images"):
        train.run(train.TrainJob(tiny_store, tiny_store, _cfg(tmp_path)), progress=False)


def test_resuming_from_a_checkpoint_of_another_config_is_refused(tiny_store, tmp_path):
    cfg = _cfg(tmp_path, epochs=2)
    result = train.run(train.TrainJob(tiny_store, tiny_store, cfg), progress=False)
    (result.run_dir / "result.json").unlink()
    header = json.loads(result.last_checkpoint.read_text())
    header["config_hash"] = "0" * 16
    result.last_checkpoint.write_text(json.dumps(header))
    with pytest.raises(checkpoints.CheckpointError, match="made by training config 0000"):
        train.run(train.TrainJob(tiny_store, tiny_store, cfg), progress=False)


def test_reconstruct_cli_writes_side_by_side_pngs(tiny_store, tmp_path):
    result = train.run(train.TrainJob(tiny_store, tiny_store, _cfg(tmp_path, epochs=1)), progress=False)
    out = CliRunner().invoke(
        app,
        [
            "reconstruct",
            "--store",
            str(tiny_store),
            "--checkpoint",
            str(result.checkpoint),
            "--out",
            str(tmp_path / "png"),
            "--n",
            "3",
        ],
    )
    assert out.exit_code == 0, out.output
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert len(pngs) == 3
    from PIL import Image

    assert Image.open(pngs[0]).size == (128, 64)
    model, header = load_reconstructor(result.checkpoint)
    store = open_store(tiny_store)
    images = reconstruct(model, store.features(slice(0, 2)), StoreInfo.of(store).preprocessing)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8


_DDP_SCRIPT = textwrap.dedent(
    """
    import sys, json
    from pathlib import Path
    from pipeline.stages import train
    from pipeline.config import TrainConfig
    args = json.loads(sys.argv[1])
    result = train.run(train.TrainJob(Path(args["store"]), Path(args["store"]), TrainConfig.model_validate(args["cfg"])), progress=False)
    print("RESULT", result.val_metrics["val_psnr_db"])
    """
)


@pytest.mark.slow
def test_training_under_torchrun_with_two_cpu_processes_completes_with_one_writer(tiny_store, tmp_path):
    cfg = _cfg(tmp_path, epochs=2, batch_size=2)
    script = tmp_path / "ddp_train.py"
    script.write_text(_DDP_SCRIPT)
    args = json.dumps({"cfg": cfg.model_dump(mode="json"), "store": str(tiny_store)})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        args,
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("RESULT") == 2
    (run_dir,) = [p for p in (tmp_path / "train").iterdir() if p.is_dir()]
    header = json.loads((run_dir / "checkpoints" / "epoch-0001.json").read_text())
    assert header["step"] == 4  # 8 images / batch 2 = 4 batches per epoch, split over 2 ranks, 2 epochs
    assert (run_dir / "metrics.csv").read_text().count("\n") == 3  # only rank 0 logs


@pytest.mark.parametrize(
    "stat, refusal",
    [("n_over_float16_max", "3 feature values are above float16's range.*float32 or bf16_bitround"),
     ("n_nonfinite", "the encoder gave 3 non-finite feature values.*encode.dtype")],
)  # fmt: skip
def test_a_store_with_non_finite_features_is_refused_by_every_stage_that_reads_it(tiny_store, tmp_path, stat,
                                                                                    refusal):  # fmt: skip
    import shutil

    from pipeline.config import EvaluateConfig
    from pipeline.jobs import EvalTarget
    from pipeline.stages import evaluate

    store = shutil.copytree(tiny_store, tmp_path / tiny_store.name)
    group = zarr.open_group(str(store), mode="r+")
    group.attrs["feature_stats"] = {**group.attrs["feature_stats"], stat: 3}
    with pytest.raises(StoreError, match=refusal):
        train.run(train.TrainJob(store, store, _cfg(tmp_path)), progress=False)
    # a reconstructor's held-out store: a NaN token made its reconstruction NaN, scored as a black image
    with pytest.raises(StoreError, match=refusal):
        evaluate.score_encoder(
            EvalTarget("tiny", store, tmp_path / "none.json"), {}, EvaluateConfig(judges=[])
        )


def test_the_lr_schedule_has_the_released_cycle_schedulers_shape():
    # Released CycleScheduler(lr, n_iter, warmup_proportion=0.05, divider=25, phase=('linear', 'cos')): linear
    # from lr/25 to lr over the warm-up, then end + (lr - end) * (1 + cos(pi * p)) / 2 down to end = lr/25/1e4.
    lr, total, warmup = 3e-4, 200, 10
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = train.lr_schedule(opt, TrainConfig(lr=lr, warmup_fraction=0.05), total)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    low, end = lr / 25, lr / 25 / 1e4
    expected = [low + (lr - low) * k / warmup for k in range(warmup)]
    expected += [
        end + (lr - end) * (1 + np.cos(np.pi * k / (total - warmup))) / 2 for k in range(total - warmup)
    ]
    np.testing.assert_allclose(seen, expected, rtol=1e-9)
    assert seen[warmup] == pytest.approx(lr) and seen[-1] < lr / 1000


@pytest.mark.parametrize("select", ["last", "best_val"])
def test_a_finished_run_whose_checkpoint_was_lost_is_said_damaged_and_trains_again_to_the_same_weights(
    tiny_store, tmp_path, one_thread, select
):
    from pipeline.artifacts import list_artifacts

    cfg = _cfg(tmp_path, epochs=3, keep_last=2, select_checkpoint=select)
    first = train.run(train.TrainJob(tiny_store, tiny_store, cfg), progress=False)
    weights = first.checkpoint.with_suffix(".safetensors")
    expected = load_file(str(weights))
    weights.rename(tmp_path / "moved.safetensors")  # moved away by hand

    (row,) = [r for r in list_artifacts(tmp_path / "train") if r["kind"] == "training run"]
    assert row["status"].startswith(f"damaged ({weights}: weights file missing;")
    again = train.run(train.TrainJob(tiny_store, tiny_store, cfg), progress=False)

    assert not again.already_complete and again.checkpoint == first.checkpoint
    got = load_file(str(weights))
    assert all(
        torch.equal(got[k], expected[k]) for k in expected
    )  # resumed (or retrained) bit-identical on CPU
    assert train.run(train.TrainJob(tiny_store, tiny_store, cfg), progress=False).already_complete
