"""The encode stage: content, bad inputs, resume after SIGKILL, lock, precision options, transforms."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from pipeline import cpus, plan
from pipeline.artifacts import WriteLock
from pipeline.config import DatasetSpec, EncodeOptions, SplitSpec, StoreOptions, SubsetSpec, TransformSpec
from pipeline.config_files import resolve_encoder
from pipeline.models import encoders
from pipeline.models.weights import weights_key
from pipeline.stages import encode
from storage import FeatureStore, StoreLocked, open_store
from storage.format import RECORDS_FOLDER
from storage.inspect import inspect_store


def test_encode_writes_features_equal_to_encoding_the_stored_pixels(make_job):
    result = encode.run(
        make_job(split="val", store=StoreOptions(shard_images=8, precision="float32")), progress=False
    )
    store = open_store(result.store_path)
    assert (result.n_images, result.n_failed) == (12, 0)
    enc = encoders.load(resolve_encoder("tiny-vit-64"))
    again = enc.encode(enc.normalize(torch.from_numpy(store.pixels(slice(0, 5))))).numpy()
    np.testing.assert_allclose(store.features(slice(0, 5)), again, rtol=1e-5, atol=1e-5)
    assert list(store.image_ids()) == sorted(store.image_ids())


def test_a_second_run_on_a_finished_store_returns_at_once_without_rewriting(make_job):
    job = make_job(split="val")
    start = time.perf_counter()
    first = encode.run(job, progress=False)
    wall = time.perf_counter() - start
    # where the run's time went: every step, each measured, adding up to the run's time
    assert set(first.seconds) == {
        "setup",
        "model load",
        "workers start",
        "decode wait",
        "model",
        "to host",
        "into buffers",
        "device wait",
        "writer wait",
        "finish",
    }
    assert min(first.seconds.values()) >= 0 and first.seconds["model"] > 0 and first.seconds["model load"] > 0
    assert 0.9 * wall <= sum(first.seconds.values()) <= wall
    assert first.timing().startswith(f"{sum(first.seconds.values()):.1f} s: ")
    stamp = (first.store_path / "zarr.json").stat().st_mtime_ns
    second = encode.run(job, progress=False)
    assert second.already_complete and second.store_path == first.store_path and second.seconds == {}
    assert (first.store_path / "zarr.json").stat().st_mtime_ns == stamp


def test_a_different_config_gets_a_different_store(make_job):
    a = encode.run(make_job(split="val"), progress=False).store_path
    b = encode.run(make_job(split="val", store=StoreOptions(shard_images=4)), progress=False).store_path
    assert a != b and a.is_dir() and b.is_dir()


def _write_bad_images(folder: Path) -> dict[str, str]:
    """Files of every awkward kind; returns file name -> expected outcome ('ok' or a reason fragment)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (80, 100, 3), dtype=np.uint8))
    rgb.save(folder / "good.jpg")
    full = (folder / "good.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))
    (folder / "notes.jpg").write_text("not an image")
    (folder / "readme.txt").write_text("not listed: a folder split lists image suffixes only")
    (folder / "empty.jpg").write_bytes(b"")
    rgb.convert("L").save(folder / "gray.jpg")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png", transparency=0)
    Image.fromarray((rng.integers(0, 65535, (80, 100))).astype(np.uint16)).save(folder / "sixteen.png")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(folder / "one_pixel.png")
    Image.new("RGB", (400, 300), (0, 128, 0)).save(folder / "huge.png")
    return {
        "good.jpg": "ok", "gray.jpg": "ok", "cmyk.jpg": "ok", "rgba.png": "ok", "palette.png": "ok",
        "sixteen.png": "ok", "truncated.jpg": "corrupt", "corrupt.jpg": "", "notes.jpg": "not an image", "empty.jpg": "empty file",
        "one_pixel.png": "too small", "huge.png": "too large",
    }  # fmt: skip


def test_bad_images_are_skipped_and_recorded_and_convertible_ones_encoded(make_job, tmp_path):
    expected = _write_bad_images(tmp_path / "images")
    dataset = DatasetSpec(
        name="bad", kind="folder", splits={"all": SplitSpec(images_dir=tmp_path / "images")}
    )
    options = EncodeOptions(batch_size=4, num_workers=2, max_image_pixels=100_000)
    result = encode.run(make_job(dataset=dataset, split="all", options=options), progress=False)
    store = open_store(result.store_path)
    failures = {Path(f["path"]).name: f["reason"] for f in store.attrs["failures"]}
    ok = {name for name, outcome in expected.items() if outcome == "ok"}
    assert set(failures) == set(expected) - ok
    for name, reason in failures.items():
        assert expected[name] in reason, (name, reason)
    assert (result.n_encoded, result.n_failed) == (len(ok), len(expected) - len(ok))
    valid = store.valid()
    assert valid.sum() == len(ok)
    assert np.all(store.features(np.flatnonzero(~valid)) == 0)
    assert np.isfinite(store.features(np.flatnonzero(valid))).all()


def test_a_coco_image_listed_but_missing_on_disk_is_recorded_as_missing(make_job, tmp_path, demo_root):
    ann = json.loads((demo_root / "annotations" / "captions_val.json").read_text())
    ann["images"].append({"id": 999999, "file_name": "gone.jpg", "width": 10, "height": 10})
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    split = SplitSpec(images_dir=demo_root / "val", annotations=tmp_path / "ann.json")
    dataset = DatasetSpec(name="coco-missing", kind="coco", splits={"val": split})
    result = encode.run(make_job(dataset=dataset, split="val"), progress=False)
    failures = open_store(result.store_path).attrs["failures"]
    assert failures == [
        {"image_id": 999999, "path": str(demo_root / "val" / "gone.jpg"), "reason": "missing file"}
    ]


def test_a_second_writer_on_the_same_store_is_refused_with_a_clear_message(make_job):
    job = make_job(split="val")
    records = encode.list_images(job.dataset, job.split, job.subset)
    path = encode.store_path_for(job, encode.store_key(job, records, torch.float32))
    with WriteLock(path), pytest.raises(StoreLocked, match="another run .* is writing this artifact"):
        encode.run(job, progress=False)
    assert encode.run(job, progress=False).n_encoded == 12  # the lock is released with its holder


_KILLABLE = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from pipeline.stages import encode
    from pipeline import plan
    from pipeline.config_files import load_run_config
    torch.set_num_threads(1)
    cfg = load_run_config(sys.argv[1])
    encode.run(plan.jobs_from_config(cfg, Path(sys.argv[1]))[0], progress=False)
    """
)


@pytest.fixture
def one_torch_thread():
    """The killed subprocess runs with one thread; the runs compared with it must too (float sums depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_encode_resumes_after_sigkill_and_equals_an_uninterrupted_run(
    write_run_config, make_job, tmp_path, one_torch_thread
):
    config = write_run_config(
        splits=["train"], encoders=["tiny-vit-112"], store={"shard_images": 4},
        encode={"batch_size": 2, "num_workers": 0},
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, str(config)], env=env, cwd=tmp_path)
    stores = tmp_path / "stores"
    deadline = time.monotonic() + 120
    killed_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(stores.glob("*.zarr/shard_done/c/*")) if stores.is_dir() else []
        if len(found) >= 3:
            proc.send_signal(signal.SIGKILL)
            killed_at = len(found)
            break
        time.sleep(0.01)
    proc.wait()
    assert killed_at is not None, "the encode subprocess ended before it could be killed"
    (path,) = stores.glob("*.zarr")
    partial = open_store(path, require_complete=False)
    n_done_before = int(partial.shard_done().sum())
    assert 0 < n_done_before < partial.layout.n_shards
    # each done shard's record is a Zarr group of its own while the store is written: a shard never rewrites the
    # others', and the store stays a Zarr hierarchy that zarr lists to the bottom without a warning
    records = {int(p.parent.name) for p in (path / RECORDS_FOLDER).glob("*/zarr.json")}
    assert set(np.flatnonzero(partial.shard_done()).tolist()) <= records
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(list(zarr.open_group(str(path), mode="r").members(max_depth=None))) > len(records)
    assert inspect_store(path)["n_encoded"] == 4 * n_done_before  # `store inspect`: the images encoded so far

    from pipeline.config_files import load_run_config

    job = plan.jobs_from_config(load_run_config(config), config)[0]
    resumed = encode.run(job, progress=False)
    assert resumed.store_path == path and not resumed.already_complete
    reference_job = make_job(
        store_root=tmp_path / "reference", encoder="tiny-vit-112", store=StoreOptions(shard_images=4),
        options=EncodeOptions(batch_size=2, num_workers=0),
    )  # fmt: skip
    reference = encode.run(reference_job, progress=False)
    a, b = open_store(resumed.store_path), open_store(reference.store_path)
    np.testing.assert_array_equal(a.features(), b.features())
    np.testing.assert_array_equal(a.pixels(), b.pixels())
    np.testing.assert_array_equal(a.image_ids(), b.image_ids())
    # the records gathered into `shards` on completion: the same content digest as the uninterrupted run's
    assert not (path / RECORDS_FOLDER).exists() and a.attrs["content_sha256"] == b.attrs["content_sha256"]


@pytest.mark.parametrize("precision,bound", [("bf16_bitround", 2.0**-8), ("float16", 2.0**-11)])
def test_reduced_precision_stays_within_its_relative_error_bound(make_job, precision, bound):
    exact = open_store(
        encode.run(make_job(split="val", store=StoreOptions(precision="float32")), progress=False).store_path
    )
    lossy = open_store(
        encode.run(make_job(split="val", store=StoreOptions(precision=precision)), progress=False).store_path
    )
    x, y = exact.features(), lossy.features()
    normal = np.abs(x) > 1e-4  # float16 subnormals have less relative precision by design
    assert np.max(np.abs(y - x)[normal] / np.abs(x)[normal]) <= bound


def test_int8_per_token_error_is_below_half_a_step_of_each_token_scale(make_job):
    exact = open_store(
        encode.run(make_job(split="val", store=StoreOptions(precision="float32")), progress=False).store_path
    )
    q = open_store(
        encode.run(
            make_job(split="val", store=StoreOptions(precision="int8_per_token")), progress=False
        ).store_path
    )
    x, y = exact.features(), q.features()
    step = np.abs(x).max(axis=-1, keepdims=True) / 127
    assert np.all(np.abs(y - x) <= step / 2 + 1e-6)
    assert q.group["features"].dtype == np.int8


def test_swap_rb_transform_lands_in_its_own_store_with_swapped_pixels(make_job):
    plain = open_store(encode.run(make_job(split="val"), progress=False).store_path)
    swapped = open_store(
        encode.run(make_job(split="val", transform=TransformSpec(name="swap_rb")), progress=False).store_path
    )
    assert plain.path != swapped.path and "swap_rb" in swapped.path.name
    np.testing.assert_array_equal(swapped.pixels(), plain.pixels()[..., ::-1])
    assert not np.allclose(swapped.features(), plain.features())


def test_a_store_creation_killed_midway_leaves_no_half_store_and_is_redone(make_job, monkeypatch):
    import zarr

    from storage.inspect import find_stores

    job = make_job(split="val")
    _, _, path = encode.plan(job)
    real = zarr.Group.create_array
    calls = []

    def dies_on_the_third_array(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")  # as a signal would, between two writes of the creation
        return real(self, *args, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_array", dies_on_the_third_array)
    with pytest.raises(KeyboardInterrupt):
        encode.run(job, progress=False)
    assert not path.exists() and find_stores(path.parent) == []  # readers never see half a store
    assert len(list(path.parent.glob(f".{path.name}.creating-*"))) == 1
    monkeypatch.setattr(zarr.Group, "create_array", real)
    result = encode.run(job, progress=False)
    assert result.n_encoded == 12 and open_store(result.store_path).complete
    assert not list(path.parent.glob(f".{path.name}.creating-*"))


def test_other_weights_in_the_same_file_path_give_another_store_key(tmp_path):
    from pipeline.config import EncoderSpec

    weights = tmp_path / "model.safetensors"
    spec = EncoderSpec(name="t", backend="timm", model_id="vit_tiny_patch16_224", resolution=64, patch_size=16,
                       preprocessing_source="timm_pretrained_cfg", weights=str(weights))  # fmt: skip
    weights.write_bytes(b"first")
    first = weights_key(spec)
    weights.write_bytes(b"second, longer")
    assert weights_key(spec) != first


@pytest.mark.parametrize("option, value, older", [("resize", "torch", "pil"), ("jpeg_draft", "1x", "2x")])
def test_a_decoding_option_is_in_the_key_and_the_value_stores_had_before_it_keeps_their_keys(
    make_job, option, value, older
):
    import dataclasses

    job = make_job(split="val")
    records = encode.list_images(job.dataset, job.split, job.subset)

    def key(v):
        options = job.options.model_copy(update={option: v})
        return encode.store_key(dataclasses.replace(job, options=options), records, torch.float32)

    assert option not in key(older) and key(value) == {**key(older), option: value}


def test_native_hf_stores_get_a_new_key_for_the_floored_crop_and_every_other_store_keeps_its_key(make_job):
    import dataclasses

    job = make_job(split="val")
    records = encode.list_images(job.dataset, job.split, job.subset)

    def key(geometry, backend):
        encoder = job.encoder.model_copy(update={"backend": backend})
        options = job.options.model_copy(update={"geometry": geometry})
        return encode.store_key(
            dataclasses.replace(job, encoder=encoder, options=options), records, torch.float32
        )

    assert "crop_offset" not in key("short_side_crop", "transformers")
    assert "crop_offset" not in key("native", "timm")
    assert key("native", "transformers")["crop_offset"] == "floor"


def test_shard_statistics_taken_on_the_device_equal_the_stores_numpy_definition():
    from pipeline.data.store_writer import feature_stats
    from storage.precision import value_stats

    features = np.random.default_rng(0).standard_normal((3, 4, 4, 8)).astype(np.float32) * 100
    features[0, 0, 0, :3] = [np.inf, np.nan, 7e4]  # non-finite values and one above float16's range
    expected, got = value_stats(features), feature_stats(torch.from_numpy(features))
    assert got.keys() == expected.keys() and got["n_nonfinite"] == 2 and got["n_over_float16_max"] == 1
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-6), name


def test_shard_statistics_of_finite_features_take_the_fast_path_and_still_agree():
    from pipeline.data.store_writer import feature_stats
    from storage.precision import value_stats

    features = np.random.default_rng(1).standard_normal((2, 3, 3, 5)).astype(np.float32)
    features[1, 2, 2, 4] = -7e4  # finite, beyond float16
    expected, got = value_stats(features), feature_stats(torch.from_numpy(features))
    assert got["n_over_float16_max"] == 1 and got["n_nonfinite"] == 0
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-6), name
    assert feature_stats(torch.zeros(0, 4))["n_tokens"] == 0


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # 3.4e38 in float16: inf in both
@pytest.mark.parametrize("precision", ["float16", "bf16_bitround", "int8_per_token", "float32"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])  # fmt: skip
def test_quantising_on_the_device_gives_the_stores_numpy_values_bit_for_bit(precision, device):
    from pipeline.data.store_writer import quantize
    from storage.precision import quantize as numpy_quantize

    rng = np.random.default_rng(2)
    features = (rng.standard_normal((2, 3, 4, 64)) * np.exp(rng.standard_normal(64) * 4)).astype(np.float32)
    features[0, 0, 0, :6] = [
        1e-40,
        -3e-39,
        3.4e38,
        1 + 2**-8,
        1 + 3 * 2**-8,
        0.0,
    ]  # subnormals, ties, overflow
    features[0, 0, 1] = 0.0  # a token of zeros: int8's scale falls back to 1
    cases = [(features, True), (features, False)]
    if precision in ("bf16_bitround", "float32"):  # int8 codes of NaN are undefined in both
        nonfinite = features.copy()
        nonfinite[1, 2, 3, :3] = [np.inf, -np.inf, np.nan]
        cases.append((nonfinite, False))
    for values, finite in cases:
        expected, expected_scale = numpy_quantize(values.copy(), precision)
        got, scale = quantize(torch.from_numpy(values.copy()).to(device), precision, finite=finite)
        got, scale = got.cpu().numpy(), None if scale is None else scale.cpu()
        assert got.dtype == expected.dtype
        bits = {1: np.uint8, 2: np.uint16, 4: np.uint32}[got.itemsize]
        np.testing.assert_array_equal(got.view(bits), expected.view(bits))
        assert (scale is None) == (expected_scale is None)
        if scale is not None:
            np.testing.assert_array_equal(scale.numpy(), expected_scale)


def test_several_writer_threads_write_the_same_store_as_one(make_job, tmp_path):
    from pipeline.config import EncodeOptions, SubsetSpec

    paths = []
    for threads in (1, 3):
        job = make_job(store_root=tmp_path / f"threads-{threads}", store=StoreOptions(shard_images=2),
                       options=EncodeOptions(batch_size=2, num_workers=0, writer_threads=threads),
                       subset=SubsetSpec(max_images=12))  # fmt: skip
        paths.append(encode.run(job, progress=False).store_path)
    one, three = (open_store(p) for p in paths)
    assert three.complete and sorted(three.attrs["shards"], key=int) == [str(i) for i in range(6)]
    assert three.attrs["content_sha256"] == one.attrs["content_sha256"]  # the very same files
    np.testing.assert_array_equal(three.features(), one.features())


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to bind a thread to one of them")
def test_a_thread_bound_to_one_cpu_encodes_with_workers_and_writers_on_all(make_job, monkeypatch, capfd):
    everything = os.sched_getaffinity(0)
    assert everything == cpus.START
    writer_cpus = []
    real_write = FeatureStore.write_shard

    def write_shard(self, *args, **kwargs):
        writer_cpus.append(os.sched_getaffinity(0))
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(FeatureStore, "write_shard", write_shard)
    # what loading torch does to the importing thread when OMP_PROC_BIND or GOMP_CPU_AFFINITY is set
    os.sched_setaffinity(0, {min(everything)})
    try:
        job = make_job(
            subset=SubsetSpec(max_images=4), options=EncodeOptions(num_workers=0, writer_threads=1)
        )
        assert encode.run(job, progress=False).n_encoded == 4
        bound_after = os.sched_getaffinity(0)
        # a decode worker that starts bound (forked here: the stage's fork server may have started while bound),
        # with the stage's worker_init_fn
        loader = torch.utils.data.DataLoader(
            range(1), batch_size=None, num_workers=1, collate_fn=os.sched_getaffinity,
            multiprocessing_context="fork", worker_init_fn=functools.partial(cpus.run_on, cpus.START),
        )  # fmt: skip
        worker_cpus = next(iter(loader))
    finally:
        os.sched_setaffinity(0, everything)
    assert writer_cpus and all(c == everything for c in writer_cpus) and worker_cpus == everything
    assert bound_after == {min(everything)}  # the caller's binding is its own business: given back as it was
    assert f"bound to 1 of the process's {len(everything)} CPUs" in capfd.readouterr().err


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to bind a thread to one of them")
def test_with_openmp_binding_set_the_cpus_are_all_the_cgroups_also_when_torch_loaded_first():
    # a notebook: torch first, then pipeline; OMP_PROC_BIND binds the thread that loads torch to one CPU
    code = "import os, torch, pipeline; print(len(pipeline.cpus.START), len(os.sched_getaffinity(0)))"
    env = {**os.environ, "OMP_PROC_BIND": "true", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == [str(len(os.sched_getaffinity(0))), "1"]


def test_a_written_shards_buffer_is_reused_reset_as_a_new_one_where_the_shapes_match():
    from pipeline.data.store_writer import add_batch, shard_buffer
    from storage import StoreLayout

    layout = StoreLayout(n_images=12, grid_hw=(2, 2), hidden_dim=8, pixel_size=4, shard_images=8,
                         precision="int8_per_token", compressor="auto", embedding_dim=3)  # fmt: skip
    spent = shard_buffer(layout, 0, 8)
    add_batch(spent, np.arange(8), torch.randn(8, 2, 2, 8))
    for name in ("pixels", "embeddings"):
        spent[name][:] = 7
    again = shard_buffer(layout, 1, 8, spent)  # as the next shard takes it from the writer
    new = shard_buffer(layout, 1, 8)
    for name in ("features", "features_scale", "pixels", "embeddings"):
        assert again[name] is spent[name]  # the same memory, no new pages
        np.testing.assert_array_equal(again[name], new[name])  # what a failed image's rows keep
    assert (
        again["shard"] == 1 and again["n_filled"] == 0 and again["failures"] == [] and again["stats"] is None
    )
    last = shard_buffer(layout, 1, 4, spent)  # the short last shard: other shapes, new arrays
    assert last["features"].shape[0] == 4 and last["features"] is not spent["features"]


def test_a_stop_asked_for_mid_encode_lands_the_batch_in_flight_and_keeps_the_shard_it_completes(
    make_job, monkeypatch
):
    import threading

    from pipeline import stop
    from pipeline.data import store_writer

    class Stopped(threading.Event):  # the CLI ends the process AFTER_STOP_S after this is set
        def set(self):
            store = open_store(encode.plan(job)[2], require_complete=False)
            self.shards_done_then = store.shard_done().tolist()
            super().set()

    monkeypatch.setattr(stop, "_requested", threading.Event())  # this process's stop, for this test only
    monkeypatch.setattr(stop, "_stopped", Stopped())
    launched = []
    queue_done = store_writer.Landing.queue_done
    write_shard = FeatureStore.write_shard
    monkeypatch.setattr(FeatureStore, "write_shard", lambda *a, **k: time.sleep(1.0) or write_shard(*a, **k))

    def and_stop_after_the_second(landing):  # the second batch of 4 completes shard 0 (8 images)
        queue_done(landing)
        launched.append(landing)
        if len(launched) == 2:
            stop.request()

    monkeypatch.setattr(store_writer.Landing, "queue_done", and_stop_after_the_second)
    job = make_job(split="val", options=EncodeOptions(batch_size=4, num_workers=0))
    with pytest.raises(stop.Interrupted):
        encode.run(job, progress=False)
    store = open_store(encode.plan(job)[2], require_complete=False)
    assert store.shard_done().tolist() == [True, False]  # the second batch was in flight: it landed first
    assert stop._stopped.shards_done_then == [True, False]  # written before the stop counted as reached
    monkeypatch.setattr(stop, "_requested", threading.Event())
    assert encode.run(job, progress=False).n_encoded == 12


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["float16", "bf16_bitround", "int8_per_token", "float32"])
def test_a_pinned_shard_buffer_filled_from_the_gpu_by_queued_copies_equals_one_filled_on_the_cpu(precision):
    from pipeline.data.store_writer import Landing, add_batch, shard_buffer
    from storage import StoreLayout

    layout = StoreLayout(n_images=8, grid_hw=(3, 4), hidden_dim=64, pixel_size=16, shard_images=8, precision=precision,
                         compressor="auto")  # fmt: skip
    features = torch.randn(8, 3, 4, 64) * 10
    batches = [np.arange(5), np.array([5, 7])]  # the second around a failed image (6): copied at once
    on_cpu = shard_buffer(layout, 0, 8)
    for rows in batches:
        add_batch(on_cpu, rows, features[rows])
    on_gpu = shard_buffer(layout, 0, 8, pinned=True)
    assert on_gpu["pinned"]["features"].is_pinned()
    landing = Landing(torch.device("cuda"))  # both batches queued, then waited for once, as the stage does
    for rows in batches:
        add_batch(on_gpu, rows, features[rows].cuda(), landing=landing)
    landing.queue_done()
    landing.wait()
    for name in ("features", "features_scale"):
        if name in on_cpu:
            np.testing.assert_array_equal(on_gpu[name], on_cpu[name])
    assert on_gpu["stats"].keys() == on_cpu["stats"].keys()
    for name, value in on_cpu["stats"].items():
        assert on_gpu["stats"][name] == pytest.approx(value, rel=1e-5), name
    again = shard_buffer(layout, 1, 8, on_gpu, pinned=True)  # a written buffer, used again: still pinned
    assert again["features"] is on_gpu["features"] and again["pinned"]["features"].is_pinned()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["float16", "bf16_bitround", "int8_per_token"])
def test_launching_a_batch_on_the_gpu_never_waits_for_the_batch_before(precision):
    """The pipelined loop's premise: the host asks for a batch's copy to the device, normalisation, forward,
    statistics, quantisation and copies into the pinned shard buffer without any call that waits for the GPU, so
    the next batch is queued while this one computes. A blocking call (a tensor made from Python numbers on the
    device, `.item()`, a pageable copy) raises under CUDA's sync debug mode."""
    from pipeline.data.store_writer import Landing, add_batch, shard_buffer
    from storage import StoreLayout

    enc = encoders.load(resolve_encoder("tiny-vit-64"), device="cuda", compute_dtype="bfloat16")
    size = enc.preprocessing.crop_size
    pixels = torch.randint(0, 256, (4, size, size, 3), dtype=torch.uint8).pin_memory()
    grid = enc.encode_layers(enc.normalize(pixels), [enc.spec.feature_layer])[0]
    layout = StoreLayout(n_images=8, grid_hw=tuple(grid.shape[1:3]), hidden_dim=grid.shape[-1], pixel_size=size,
                         shard_images=8, precision=precision, compressor="auto")  # fmt: skip
    buffer = shard_buffer(layout, 0, 8, pinned=True)

    def launch(rows):
        landing = Landing(enc.device)
        grids = enc.encode_layers(enc.normalize(pixels), [enc.spec.feature_layer])
        add_batch(buffer, rows, grids[0], landing=landing)
        landing.queue_done()
        return landing

    launch(np.arange(4)).wait()  # the first batch makes what is made once (constants, kernels, pinned blocks)
    torch.cuda.set_sync_debug_mode("error")
    try:
        landing = launch(np.arange(4, 8))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    landing.wait()
    assert buffer["stats"]["n_tokens"] == 8 * grid.shape[1] * grid.shape[2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_shard_statistics_queued_on_the_gpu_equal_the_stores_numpy_definition():
    from pipeline.data.store_writer import Landing, shard_buffer
    from storage import StoreLayout
    from storage.precision import value_stats

    features = np.random.default_rng(0).standard_normal((3, 4, 4, 8)).astype(np.float32) * 100
    features[0, 0, 0, :3] = [np.inf, np.nan, 7e4]
    layout = StoreLayout(n_images=3, grid_hw=(4, 4), hidden_dim=8, pixel_size=4, shard_images=3,
                         precision="float32", compressor="auto")  # fmt: skip
    buffer = shard_buffer(layout, 0, 3, pinned=True)
    landing = Landing(torch.device("cuda"))
    assert landing.add_stats(buffer, torch.from_numpy(features).cuda()) is False  # not known before the wait
    landing.queue_done()
    landing.wait()
    expected, got = value_stats(features), buffer["stats"]
    assert got.keys() == expected.keys() and (got["n_nonfinite"], got["n_over_float16_max"]) == (2, 1)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-6), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_stage_on_the_gpu_writes_the_store_the_cpu_writes(make_job, tmp_path):
    """The whole pipelined loop on a GPU (pinned shard buffers, each batch landing while the next computes, the
    rows around a bad image copied apart): the same pixels, ids and failures as on the CPU, and the features within
    float32's GPU/CPU differences (TF32 convolutions)."""
    _write_bad_images(tmp_path / "images")
    dataset = DatasetSpec(
        name="bad", kind="folder", splits={"all": SplitSpec(images_dir=tmp_path / "images")}
    )
    stores = {}
    for device in ("cpu", "cuda"):
        job = make_job(
            dataset=dataset, split="all", store_root=tmp_path / device,
            store=StoreOptions(shard_images=8, precision="float32"),
            options=EncodeOptions(batch_size=4, num_workers=2, max_image_pixels=100_000, device=device,
                                  compute_dtype="float32"),
        )  # fmt: skip
        stores[device] = open_store(encode.run(job, progress=False).store_path)
    cpu, gpu = stores["cpu"], stores["cuda"]
    assert gpu.attrs["failures"] == cpu.attrs["failures"] and cpu.attrs["failures"]
    np.testing.assert_array_equal(gpu.image_ids(), cpu.image_ids())
    np.testing.assert_array_equal(gpu.valid(), cpu.valid())
    np.testing.assert_array_equal(gpu.pixels(slice(None)), cpu.pixels(slice(None)))
    np.testing.assert_allclose(gpu.features(slice(None)), cpu.features(slice(None)), rtol=2e-2, atol=2e-2)


_DECODE_MAIN = """
import os, sys
from pathlib import Path

if __name__ == "__mp_main__":  # a worker importing this program, as spawn and fork-server workers do
    Path(os.environ["IMPORTED_BY"], str(os.getpid())).touch()

if __name__ == "__main__":
    import numpy as np
    from PIL import Image
    from pipeline.config import EncodeOptions, TransformSpec
    from pipeline.data import decode_workers, worker_processes
    from pipeline.data.datasets import ImageRecord
    from pipeline.data.images import Preprocessing

    folder = Path(sys.argv[1])
    for i in range(4):
        Image.fromarray(np.full((40, 48, 3), 60 * i, np.uint8)).save(folder / f"{i}.jpg")
    # 2,000 more records: the pickled dataset is larger than a pipe's buffer, as any real split's is
    records = [ImageRecord(image_id=i, path=folder / f"{i % 4}.jpg") for i in range(2004)]
    preprocessing = Preprocessing("shortest", 32, 32, "bicubic", (0.5,) * 3, (0.5,) * 3, "test")
    dataset = decode_workers.DecodeDataset(records, preprocessing, TransformSpec(), EncodeOptions())
    loader = decode_workers.loader(dataset, [[0, 1], [2, 3]], num_workers=2, pin_memory=False)
    batches = worker_processes.started(loader) if sys.argv[2] == "started" else iter(loader)
    print(sum(len(reasons) for _, _, reasons in batches if not any(reasons)))
"""


@pytest.mark.parametrize("start", ["started", "plain iter"])
def test_decode_workers_never_import_the_program_that_started_them(tmp_path, start):
    """A served Prefect run's program is prefect.engine: each worker importing it cost seconds, one after the
    other. `plain iter` is the control: it shows this test sees such imports. Run where a folder named
    `pipeline` is (an older checkout): the fork server, started with `python -c`, put the working directory first
    on its path and every worker imported that folder's code and died."""
    here = tmp_path / "work"
    for package in ("pipeline", "pipeline/data"):
        (here / package).mkdir(parents=True)
        (here / package / "__init__.py").write_text("")
    script, imported_by = tmp_path / "program.py", tmp_path / "imported-by"
    script.write_text(_DECODE_MAIN)
    imported_by.mkdir()
    env = {**os.environ, "IMPORTED_BY": str(imported_by), "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), start],
        cwd=here,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "4"  # every image decoded
    assert len(list(imported_by.iterdir())) == (0 if start == "started" else 2)


def test_a_dataset_root_with_other_files_under_the_same_names_is_refused_not_read_from_the_cache(
    make_job, demo_dataset, tmp_path
):
    import shutil

    from PIL import Image

    from storage import StoreError

    first = encode.run(make_job(split="val"), progress=False)
    copy = tmp_path / "mirrored"
    shutil.copytree(demo_dataset.root, copy)
    assert encode.plan(make_job(split="val", dataset=demo_dataset.model_copy(update={"root": copy})))[2] == (
        first.store_path
    )  # the same files elsewhere: the same store
    for path in (copy / "val").iterdir():  # a mirrored copy: the same names, other pixels
        Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path)
    mirrored = make_job(split="val", dataset=demo_dataset.model_copy(update={"root": copy}))

    with pytest.raises(StoreError, match=rf"made from other image files than {copy} .*another `name:`"):
        encode.run(mirrored, progress=False)

    renamed = make_job(
        split="val", dataset=demo_dataset.model_copy(update={"root": copy, "name": "mirrored"})
    )
    assert encode.run(renamed, progress=False).store_path != first.store_path


def test_a_split_of_which_no_image_can_be_used_is_an_error_not_an_empty_store(make_job, tmp_path):
    from pipeline.config import DatasetSpec, SplitSpec
    from storage import StoreError

    (tmp_path / "pics").mkdir()
    for name in ("a.jpg", "b.png", "notes.txt"):  # the .txt is not even listed
        (tmp_path / "pics" / name).write_text("not an image")
    folder = DatasetSpec(
        name="plain", kind="folder", root=tmp_path, splits={"val": SplitSpec(images_dir="pics")}
    )
    job = make_job(split="val", dataset=folder)

    with pytest.raises(StoreError, match=r"none of its 2 images could be used \(2 not an image .*images_dir"):
        encode.run(job, progress=False)
    assert not list((tmp_path / "stores").glob("*.zarr"))  # nothing left that a rerun would call finished
