"""The store format as storage/README.md specifies it, read with plain zarr / dask / xarray."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.config import StoreOptions
from pipeline.stages import encode
from storage import FORMAT_VERSION, StoreError, open_store

SPEC = Path(__file__).resolve().parent.parent / "storage" / "README.md"


@pytest.fixture
def finished_store(make_job) -> Path:
    return encode.run(make_job(split="val"), progress=False).store_path


def spec_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", SPEC.read_text(), flags=re.S)


def test_spec_has_examples_for_zarr_dask_and_xarray():
    joined = "\n".join(spec_examples())
    assert "zarr.open_group" in joined and "da.from_zarr" in joined and "xr.open_zarr" in joined


@pytest.mark.parametrize("precision", ["float16", "int8_per_token"])
def test_every_spec_example_runs_against_a_real_store_without_reconlab_and_gets_its_values(
    make_job, demo_root, tmp_path, precision
):
    import shutil

    from pipeline.config import DatasetSpec, SplitSpec

    images = tmp_path / "images"  # the demo's val photos and a broken file: a failed image's zero row
    shutil.copytree(demo_root / "val", images)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))
    dataset = DatasetSpec(name="spec", kind="folder", splits={"val": SplitSpec(images_dir=images)})
    path = encode.run(make_job(dataset=dataset, split="val", store=StoreOptions(shard_images=8, precision=precision)),
                      progress=False).store_path  # fmt: skip
    namespace = {"STORE": str(path), "zarr": zarr}
    for example in spec_examples():
        exec(compile(example, str(SPEC), "exec"), namespace)  # noqa: S102 (the spec's own examples)
    store = open_store(path)
    row = int(np.flatnonzero(store.valid())[0])
    np.testing.assert_array_equal(
        namespace["first"], store.features(slice(row, row + 1))[0]
    )  # int8: times scale
    assert not store.valid().all()  # the examples must skip the zero row
    expected_norm = np.linalg.norm(store.features(np.flatnonzero(store.valid())), axis=-1).mean()
    assert float(namespace["token_norm"]) == pytest.approx(float(expected_norm), rel=1e-5)
    assert namespace["one"].shape == (4, 4, 192)
    shards = zarr.open_group(str(path), mode="r").attrs["shards"]  # content_sha256 by the spec's recipe
    recipe = json.dumps({k: r["files"] for k, r in shards.items()}, sort_keys=True)
    assert hashlib.sha256(recipe.encode()).hexdigest() == store.attrs["content_sha256"]


def test_store_arrays_match_the_spec_table(finished_store):
    g = zarr.open_group(str(finished_store), mode="r")
    n = g.attrs["n_images"]
    k = g.attrs["layout"]["shard_images"]
    assert g["features"].dtype == np.float16
    assert g["features"].chunks == (1, 4, 4, 192) and g["features"].shards == (k, 4, 4, 192)
    assert g["pixels"].shape == (n, 64, 64, 3) and g["pixels"].dtype == np.uint8
    assert g["image_ids"].dtype == np.int64 and g["valid"].dtype == bool
    assert g["shard_done"].shape == (-(-n // k),)
    assert list(g["features"].metadata.dimension_names) == ["image", "h", "w", "d"]
    assert finished_store.name.endswith(f"__{g.attrs['config_hash']}.zarr")


def test_store_records_config_encoder_provenance_and_counts(finished_store):
    attrs = open_store(finished_store).attrs
    assert attrs["reconlab_store_format"] == FORMAT_VERSION
    enc = attrs["encoder"]
    assert enc["feature_layer"] == -2 and enc["n_prefix_tokens_dropped"] == 1 and enc["grid_hw"] == [4, 4]
    assert enc["weights_id"].startswith("random-init seed=0 sha256=")
    assert (
        enc["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and enc["preprocessing"]["interpolation"] == "bicubic"
    )
    assert set(attrs["provenance"]["package_versions"]) >= {"torch", "timm", "zarr"}
    assert attrs["provenance"]["git_commit"]
    assert attrs["n_encoded"] + attrs["n_failed"] == attrs["n_images"]
    assert attrs["feature_stats"]["n_over_float16_max"] == 0


def test_opening_a_store_of_another_format_version_fails_naming_both(finished_store):
    g = zarr.open_group(str(finished_store), mode="r+")
    g.attrs["reconlab_store_format"] = 99
    with pytest.raises(StoreError, match="version 99.*reads version 2"):
        open_store(finished_store)


def test_opening_a_store_with_a_wrong_shape_fails_naming_the_array(finished_store):
    g = zarr.open_group(str(finished_store), mode="r+")
    layout = dict(g.attrs["layout"])
    layout["hidden_dim"] = 7
    g.attrs["layout"] = layout
    with pytest.raises(StoreError, match="'features' has shape"):
        open_store(finished_store)


def test_opening_an_incomplete_store_fails_unless_allowed(finished_store):
    # a shard taken back the way a writer does (`complete` cleared first: readers trust it, see storage/README.md)
    open_store(finished_store, mode="r+").reopen_shards([0])
    assert zarr.open_group(str(finished_store), mode="r")["shard_done"][0] == np.False_
    with pytest.raises(StoreError, match=r"incomplete \(\d+/\d+ shards done\)"):
        open_store(finished_store)
    assert not open_store(finished_store, require_complete=False).complete


def test_opening_a_folder_that_is_not_a_store_fails(tmp_path):
    with pytest.raises(StoreError, match="not a feature store"):
        open_store(tmp_path)


def test_encode_embeddings_stores_each_images_pooled_embedding_only_for_encoders_with_a_head(make_job):
    import torch

    from pipeline.config import EncodeOptions, SubsetSpec
    from pipeline.models import encoders
    from pipeline.stages import encode
    from storage import open_store

    options = EncodeOptions(batch_size=4, num_workers=0, embeddings=True)
    judge = encode.run(
        make_job(encoder="tiny-judge", options=options, subset=SubsetSpec(max_images=6)), progress=False
    )
    store = open_store(judge.store_path)
    g = zarr.open_group(str(judge.store_path), mode="r")
    assert g["embeddings"].shape == (6, store.layout.embedding_dim) and list(
        g["embeddings"].metadata.dimension_names
    ) == ["image", "e"]
    encoder = encoders.load(store_spec := make_job(encoder="tiny-judge").encoder, device="cpu")
    seen = encoder.normalize(encoder.seen(torch.from_numpy(store.pixels())))
    np.testing.assert_allclose(store.embeddings(), encoder.embed(seen).numpy(), rtol=1e-4, atol=1e-5)
    assert store_spec.keep_head and "embeddings" in store.attrs["config"]
    # an encoder without a head has nothing to pool: the option leaves its store (and its key) as before
    plain = make_job(subset=SubsetSpec(max_images=6))
    with_option = make_job(options=options, subset=SubsetSpec(max_images=6))
    assert encode.plan(plain)[2] == encode.plan(with_option)[2]
    assert "embeddings" not in zarr.open_group(
        str(encode.run(with_option, progress=False).store_path), mode="r"
    )


def test_reads_widen_stored_values_exactly_as_numpy_defines_them():
    """dequantize runs in torch for speed; the values must be NumPy's: float16 widened, int8 codes times scale."""
    from storage.precision import dequantize

    rng = np.random.default_rng(0)
    # every kind of float16, NaN and inf too
    halves = rng.integers(0, 2**16, (3, 4, 5, 64), dtype=np.uint16).view(np.float16)
    halves.flags.writeable = False  # as zarr may hand them over
    codes = rng.integers(-127, 128, (3, 4, 5, 64), dtype=np.int8)
    scale = (rng.random((3, 4, 5)) * 10.0 ** rng.integers(-40, 30, (3, 4, 5))).astype(np.float32)
    out = np.full(codes.shape, 7.0, np.float32)

    widened = dequantize(halves, None)
    assert widened.dtype == np.float32
    reference = halves.astype(np.float32)
    numbers = ~np.isnan(reference)  # NaN stays NaN; the CPU's conversion quiets a signalling NaN's payload
    np.testing.assert_array_equal(widened.view(np.uint32)[numbers], reference.view(np.uint32)[numbers])
    assert np.isnan(widened[~numbers]).all() and (~numbers).sum() > 0
    assert dequantize(codes, scale, out) is out
    expected = np.multiply(codes, scale[..., None], dtype=np.float32)
    np.testing.assert_array_equal(out.view(np.uint32), expected.view(np.uint32))
