"""Identity is declared: a runtime field (workers, validation cadence, checkpoint rotation, output paths, figures)
never changes which artifact a stage makes, an identity field always does; device and dtype are resolved before
hashing; records are written atomically and a damaged one never blocks a stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.artifacts import identity, read_json, write_json_atomic
from pipeline.config import (
    EncodeOptions,
    OperatorPairSpec,
    OperatorsConfig,
    StoreOptions,
    SubsetSpec,
    TrainConfig,
    TransformSpec,
)
from pipeline.stages import encode, operators, train
from storage import open_store

FAST = dict(epochs=1, batch_size=4, n_val_images=4, n_sample_images=2, shuffle_buffer_images=4)


def test_identity_leaves_out_runtime_fields_at_every_depth():
    cfg = TrainConfig(**FAST)
    assert "val_every_steps" not in identity(cfg) and "keep_last" not in identity(cfg)
    assert identity(cfg)["model"]["upsample_kernel"] == 4 and identity(cfg)["lr"] == cfg.lr
    ops = OperatorsConfig(pairs=[OperatorPairSpec(transform=TransformSpec(name="swap_rb"))])
    assert identity(ops)["pairs"] == [{"transform": {"name": "swap_rb", "channel": None, "alpha": None, "factor": None},
                                       "direction": "forward", "alphas": None}]  # fmt: skip
    assert "dask_address" not in identity(ops) and "output_root" not in identity(ops)


def test_encode_batching_and_workers_reuse_the_store_and_the_geometry_does_not(make_job):
    base = make_job(subset=SubsetSpec(max_images=4))
    tuned = make_job(subset=SubsetSpec(max_images=4), options=EncodeOptions(batch_size=3, num_workers=1))
    other = make_job(subset=SubsetSpec(max_images=4), options=EncodeOptions(geometry="native"))
    assert encode.plan(base)[2] == encode.plan(tuned)[2] != encode.plan(other)[2]


def test_training_runtime_fields_reuse_the_run_and_identity_fields_do_not(make_job, tmp_path):
    store = encode.run(
        make_job(subset=SubsetSpec(max_images=4), store=StoreOptions(shard_images=4)), progress=False
    )
    path = store.store_path
    cfg = TrainConfig(output_root=tmp_path / "train", **FAST)
    first = train.run(train.TrainJob(path, path, cfg), progress=False)
    runtime = cfg.model_copy(
        update={"val_every_steps": 7, "keep_last": 5, "prefetch_batches": 1, "n_sample_images": 1}
    )
    again = train.run(train.TrainJob(path, path, runtime), progress=False)
    assert again.already_complete and again.run_dir == first.run_dir
    changed = train.run(train.TrainJob(path, path, cfg.model_copy(update={"lr": 1e-3})), progress=False)
    assert not changed.already_complete and changed.run_dir != first.run_dir


def test_a_cpu_run_and_a_cuda_bf16_run_have_different_keys(make_job):
    path = encode.run(make_job(subset=SubsetSpec(max_images=4)), progress=False).store_path
    store = open_store(path)
    job = train.TrainJob(path, path, TrainConfig(**FAST))
    cpu = train.run_key(job, store, store, torch.device("cpu"))
    cuda = train.run_key(job, store, store, torch.device("cuda"))
    assert (cpu["device"], cpu["compute_dtype"]) == ("cpu", "float32")
    assert (cuda["device"], cuda["compute_dtype"]) == ("cuda", "bfloat16")  # 'auto' resolved before hashing
    explicit = train.TrainJob(path, path, TrainConfig(**FAST, compute_dtype="float32"))
    assert train.run_key(explicit, store, store, torch.device("cpu")) == cpu


def test_a_truncated_result_record_does_not_block_the_stage(make_job, tmp_path):
    path = encode.run(make_job(subset=SubsetSpec(max_images=4)), progress=False).store_path
    job = train.TrainJob(path, path, TrainConfig(output_root=tmp_path / "train", **FAST))
    first = train.run(job, progress=False)
    (first.run_dir / "result.json").write_text(
        '{"checkpoint": "runs/tr'
    )  # killed mid-write by an older version
    again = train.run(job, progress=False)  # resumes from the last epoch checkpoint and rewrites the record
    assert again.checkpoint == first.checkpoint and json.loads((first.run_dir / "result.json").read_text())


def test_operator_figures_and_cluster_address_reuse_the_fit_and_the_ridge_does_not(make_job, tmp_path):
    opts = StoreOptions(shard_images=4)
    train_store = encode.run(make_job(subset=SubsetSpec(max_images=8), store=opts), progress=False).store_path
    identity_store = encode.run(make_job(split="val", store=opts), progress=False).store_path
    swapped = encode.run(
        make_job(split="val", store=opts, transform=TransformSpec(name="swap_rb")), progress=False
    )
    checkpoint = train.run(
        train.TrainJob(train_store, identity_store, TrainConfig(output_root=tmp_path / "train", **FAST)),
        progress=False,
    ).checkpoint
    pair = OperatorPairSpec(transform=TransformSpec(name="swap_rb"))
    cfg = OperatorsConfig(output_root=tmp_path / "ops", n_fit_images=8, n_eval_images=2, n_grid_images=2)

    def run(c):
        return operators.run(operators.OperatorJob(identity_store, swapped.store_path, pair, checkpoint, c))

    first = run(cfg)
    assert run(cfg.model_copy(update={"n_grid_images": 1, "encoders": ["x"]})).out_dir == first.out_dir
    assert run(cfg.model_copy(update={"ridge": 0.1})).out_dir != first.out_dir


def test_records_are_replaced_whole_and_unreadable_ones_read_as_absent(tmp_path):
    path = tmp_path / "result.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert read_json(path) == {"a": 2} and [p.name for p in tmp_path.iterdir()] == ["result.json"]
    path.write_text("{")
    assert read_json(path) is None and read_json(tmp_path / "missing.json") is None


def test_a_weights_file_swapped_under_a_valid_header_is_refused(tmp_path):
    import pytest

    from pipeline.config import ReconstructorConfig
    from pipeline.models import checkpoints
    from pipeline.models.reconstructor import Reconstructor

    torch.manual_seed(0)
    model = Reconstructor(ReconstructorConfig(depth=1), 32, (2, 2), 4, 8)
    checkpoints.save(tmp_path, "a", model, {"note": "a"})
    torch.manual_seed(1)
    checkpoints.save(
        tmp_path, "b", Reconstructor(ReconstructorConfig(depth=1), 32, (2, 2), 4, 8), {"note": "b"}
    )
    header = checkpoints.read_header(tmp_path / "a.json")
    checkpoints.load_weights(header, model)  # the untouched checkpoint loads
    (tmp_path / "b.safetensors").replace(tmp_path / "a.safetensors")  # same shapes, other weights
    with pytest.raises(checkpoints.CheckpointError, match="SHA-256 differs"):
        checkpoints.load_weights(header, model)


def test_one_grayscale_the_transform_equals_pils_luma_up_to_rounding():
    import numpy as np
    from PIL import Image
    from skimage import data

    from pipeline.data.transforms import grayscale

    for image in (data.astronaut(), data.coffee()):
        ours = grayscale(image)
        theirs = np.asarray(Image.fromarray(image).convert("L"))
        assert (ours[..., 0] == ours[..., 2]).all()
        assert np.abs(ours[..., 0].astype(int) - theirs).max() <= 1
        assert (ours[..., 0] != theirs).mean() < 0.001


def test_a_first_download_keys_the_store_by_the_commit_the_loader_records(
    monkeypatch, tmp_path, demo_dataset
):
    import huggingface_hub
    import pytest
    from safetensors.torch import save_file

    from pipeline.config import EncoderSpec
    from pipeline.models import _torchvision_shim

    _torchvision_shim.install()  # before timm (platform notes)
    import timm

    from pipeline.models.weights import WeightsNotFoundError, weights_key

    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_id = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    spec = EncoderSpec(name="tiny-pretrained", backend="timm", model_id=model_id, resolution=64, patch_size=16,
                       preprocessing_source="timm_pretrained_cfg")  # fmt: skip
    job = encode.EncodeJob(tmp_path / "stores", demo_dataset, "val", SubsetSpec(max_images=4), spec, TransformSpec(),
                           StoreOptions(shard_images=4), EncodeOptions(batch_size=4, num_workers=0))  # fmt: skip
    # Offline with nothing cached the commit cannot be known: nothing is keyed under a placeholder.
    assert weights_key(spec) == f"hf:timm/{model_id}@unresolved"
    with pytest.raises(WeightsNotFoundError):
        encode.run(job, progress=False)
    assert not list((tmp_path / "stores").glob("*.zarr"))
    # The download, as huggingface_hub lays it out: snapshots/<commit>/ and refs/main naming that commit.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / f"models--timm--{model_id}"
    (repo_dir / "snapshots" / commit).mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    weights = {k: v.contiguous() for k, v in timm.create_model("vit_tiny_patch16_224").state_dict().items()}
    save_file(weights, str(repo_dir / "snapshots" / commit / "model.safetensors"))
    key = weights_key(spec)
    assert key == f"hf:timm/{model_id}@{commit}"
    first = encode.run(job, progress=False)
    attrs = open_store(first.store_path).attrs
    assert attrs["config"]["weights"] == attrs["encoder"]["weights_id"] == key  # one identity, key and record
    assert encode.run(job, progress=False).store_path == first.store_path


def test_a_deleted_shard_of_a_finished_store_is_detected_listed_and_re_encoded(make_job):
    from typer.testing import CliRunner

    from flows.cli import app
    from pipeline.plan_table import store_state
    from storage import StoreError

    job = make_job(subset=SubsetSpec(max_images=8), store=StoreOptions(shard_images=4))
    path = encode.run(job, progress=False).store_path
    before = open_store(path)
    digest, features = before.content_sha256, before.features()
    victim = path / "features" / "c" / "1" / "0" / "0" / "0"
    victim.unlink()
    with pytest.raises(
        StoreError, match=r"shard 1: features: file features/c/1/0/0/0 is missing.*reconlab encode"
    ):
        open_store(path)
    assert store_state(path).startswith("partial (1 damaged shard")
    listed = CliRunner().invoke(app, ["store", "ls", str(path.parent)])
    assert "DAMAGED: 1 shard(s)" in listed.output, listed.output
    again = encode.run(job, progress=False)  # re-encodes exactly the damaged shard
    assert not again.already_complete and again.n_encoded == 8
    repaired = open_store(path)
    assert repaired.content_sha256 == digest  # CPU encoding is deterministic: the same bytes again
    np.testing.assert_array_equal(repaired.features(), features)


def test_changed_bytes_of_the_same_size_are_refused_then_repaired_by_verify_and_encode(make_job):
    from typer.testing import CliRunner

    from flows.cli import app
    from storage import StoreError

    job = make_job(subset=SubsetSpec(max_images=8), store=StoreOptions(shard_images=4))
    path = encode.run(job, progress=False).store_path
    digest = open_store(path).content_sha256
    victim = path / "pixels" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    store = open_store(path)  # sizes agree: opening stays cheap (no hashing)
    store.pixels(slice(4, 8))  # shard 1 is intact
    with pytest.raises(StoreError, match="shard 0: pixels: .* does not match its SHA-256"):
        store.pixels(0)
    from pipeline.stages.verify import verify

    with pytest.raises(StoreError, match=f"does not match its SHA-256.*store verify {path} --repair"):
        verify(path, 2, device="cpu")
    features_file = path / "features" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(features_file.read_bytes())
    data[-40] ^= 0xFF
    features_file.write_bytes(bytes(data))
    inspected = CliRunner().invoke(app, ["store", "inspect", str(path)])  # described, not a traceback
    assert inspected.exit_code == 0 and "not sampled: " in inspected.output, inspected.output
    assert encode.run(job, progress=False).already_complete  # sizes agree: encode alone cannot see it
    repaired = CliRunner().invoke(app, ["store", "verify", str(path), "--repair"])
    assert repaired.exit_code == 0, repaired.output
    assert "took back shard 0: pixels" in repaired.output and "took back shard 1: features" in repaired.output
    again = encode.run(job, progress=False)  # now re-encodes exactly that shard
    assert not again.already_complete and open_store(path).content_sha256 == digest
    assert (
        "OK: 2 images"
        in CliRunner().invoke(app, ["store", "verify", str(path), "--repair", "--recompute", "2"]).output
    )


def test_a_store_whose_zarr_json_is_not_json_is_listed_and_refused_in_one_line(make_job):
    from typer.testing import CliRunner

    from flows.cli import app

    path = encode.run(make_job(subset=SubsetSpec(max_images=4)), progress=False).store_path
    (path / "zarr.json").write_text("{broken")
    for command in (["store", "inspect", str(path)], ["store", "verify", str(path)]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2 and "zarr.json is not a readable Zarr v3 group" in result.output, (
            result.output
        )
    listed = CliRunner().invoke(app, ["store", "ls", str(path.parent)])
    assert listed.exit_code == 0 and f"{path}: zarr.json is not a readable" in listed.output, listed.output
    everything = CliRunner().invoke(app, ["ls", str(path.parent)])
    assert everything.exit_code == 0 and "unreadable" in everything.output, everything.output


def test_store_inspect_describes_a_store_whose_shard_files_the_os_will_not_read(make_job, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    from storage import inspect as store_inspect

    path = encode.run(make_job(subset=SubsetSpec(max_images=4)), progress=False).store_path
    shard = str(path / "features" / "c" / "0" / "0" / "0" / "0")

    def unreadable(store, rows):  # chmod 000 does not stop root, who may run the tests
        raise PermissionError(13, "Permission denied", shard)

    monkeypatch.setattr(store_inspect, "_sampled_stats", unreadable)
    result = CliRunner().invoke(app, ["store", "inspect", str(path)])
    assert result.exit_code == 0 and f"not sampled: {shard}: Permission denied" in result.output, (
        result.output
    )


def test_a_store_re_encoded_with_other_bytes_gives_its_readers_a_new_key(make_job, monkeypatch):
    from pipeline.models import encoders

    job = make_job(subset=SubsetSpec(max_images=4), store=StoreOptions(shard_images=4))
    path = encode.run(job, progress=False).store_path
    train_job = train.TrainJob(path, path, TrainConfig(**FAST))
    key_before = train.run_key(train_job, open_store(path), open_store(path), torch.device("cpu"))
    (path / "features" / "c" / "0" / "0" / "0" / "0").unlink()
    # Another machine's rounding (e.g. a GPU) re-encodes the shard with other bytes under the same store key.
    original = encoders.Encoder.encode_layers
    monkeypatch.setattr(encoders.Encoder, "encode_layers",
                        lambda self, x, layers: [g * (1 + 2**-9) for g in original(self, x, layers)])  # fmt: skip
    assert encode.run(job, progress=False).store_path == path
    key_after = train.run_key(train_job, open_store(path), open_store(path), torch.device("cpu"))
    assert key_after["train_store"]["config_hash"] == key_before["train_store"]["config_hash"]
    assert key_after["train_store"]["content_sha256"] != key_before["train_store"]["content_sha256"]


def test_verify_names_every_damaged_shard_at_once_a_truncated_and_a_changed_one(make_job):
    from pipeline.stages.verify import verify
    from storage import StoreError

    job = make_job(subset=SubsetSpec(max_images=8), store=StoreOptions(shard_images=4))
    path = encode.run(job, progress=False).store_path
    changed, truncated = (path / "features" / "c" / str(i) / "0" / "0" / "0" for i in (0, 1))
    data = bytearray(changed.read_bytes())
    data[-40] ^= 0xFF
    changed.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-10])

    with pytest.raises(StoreError, match=r"2 finished shard\(s\) changed on disk"):  # was: 1, the truncated
        verify(path, 2, device="cpu")


def test_readers_share_an_artifact_and_keep_writers_force_and_repair_off_it(tmp_path):
    import os

    from pipeline.artifacts import ReadLock, WriteLock, reading
    from storage import StoreLocked

    store, me = tmp_path / "x.zarr", os.getpid()
    with (
        ReadLock(store, wait_s=0),
        ReadLock(store, wait_s=0),  # any number of readers
        pytest.raises(StoreLocked, match=rf"x.zarr: another run \(pid {me}\) is reading this artifact"),
    ):
        WriteLock(store, wait_s=0).__enter__()
    with (
        WriteLock(store, wait_s=0),
        pytest.raises(StoreLocked, match=rf"another run \(pid {me}\) is writing this artifact"),
    ):
        ReadLock(store, wait_s=0).__enter__()
    with WriteLock(store, wait_s=0):  # readers gone: free again
        pass
    other, missing = tmp_path / "run", tmp_path / "missing.zarr"
    store.mkdir(), other.mkdir()
    with reading(store, None, store, other, missing):  # None, repeats and missing artifacts skipped
        for path in (store, other):
            with pytest.raises(StoreLocked, match="is reading"):
                WriteLock(path, wait_s=0).__enter__()
    assert not missing.with_name("missing.zarr.lock").exists()
    link = tmp_path / "shared" / "link.zarr"  # a store reached through a symlink is the same artifact
    link.parent.mkdir()
    link.symlink_to(store)
    with ReadLock(link, wait_s=0), pytest.raises(StoreLocked, match="is reading"):
        WriteLock(store, wait_s=0).__enter__()


@pytest.mark.parametrize(
    "stage", ["train", "operators", "evaluate", "tokens", "sae", "reconstruct", "reconstruct RUN_DIR"]
)
def test_every_stage_holds_its_inputs_read_locked_while_it_runs(stage, tmp_path, monkeypatch):
    """What `--force` and `store verify --repair` rely on: each input is locked for the whole stage (the stage's
    work is replaced by a probe that tries to take each input's write lock)."""
    import contextlib

    from pipeline import jobs
    from pipeline.artifacts import WriteLock
    from pipeline.stages import evaluate, operators, reconstruct, sae, tokens, train
    from storage import StoreLocked

    a, b, text, run_dir = (tmp_path / name for name in ("a.zarr", "b.zarr", "captions.zarr", "run"))
    for artifact in (a, b, text, run_dir):
        artifact.mkdir()
    checkpoint = run_dir / "checkpoints" / "best.json"  # the train stage's layout: the run is locked
    module, work, inputs, call = {
        "train": (train, "_run", [a, b], lambda: train.run(jobs.TrainJob(a, b, None))),
        "operators": (operators, "_run", [a, b, run_dir],
                      lambda: operators.run(jobs.OperatorJob(a, b, None, checkpoint, None))),
        "evaluate": (evaluate, "_scores_and_report", [a, b, run_dir],
                     lambda: evaluate.run([jobs.EvalTarget("x", a, checkpoint), jobs.EvalTarget("y", b, checkpoint)],
                                          None, {})),
        "tokens": (tokens, "_run", [a, b, run_dir], lambda: tokens.run(jobs.TokensJob(a, b, checkpoint, None, None))),
        "sae": (sae, "_run", [a, b, run_dir, text], lambda: sae.run(jobs.SaeJob(a, b, checkpoint, None, text))),
        "reconstruct": (reconstruct, "_write", [a, run_dir],
                        lambda: reconstruct.write_side_by_side(a, checkpoint, tmp_path / "out")),
        "reconstruct RUN_DIR": (reconstruct, "_write", [a, run_dir],  # `--checkpoint` takes the run's folder too
                                lambda: reconstruct.write_side_by_side(a, run_dir, tmp_path / "out")),
    }[stage]  # fmt: skip
    refused = []

    def probe(*args, **kwargs):
        for path in inputs:
            with contextlib.suppress(StoreLocked), WriteLock(path, wait_s=0):
                continue
            refused.append(path)

    monkeypatch.setattr(module, work, probe)
    call()
    assert refused == inputs
    with contextlib.ExitStack() as locks:  # released when the stage ends
        for path in inputs:
            locks.enter_context(WriteLock(path, wait_s=0))
