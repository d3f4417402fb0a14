"""Stores are Zarr v3 that another implementation reads: every precision's store gives tensorstore the same values
as zarr-python, with only codecs of the Zarr v3 specification in its chain; bf16_bitround's rounding (done before
writing) equals numcodecs' BitRound bit for bit."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorstore
import zarr

from pipeline.config import StoreOptions, SubsetSpec
from pipeline.stages import encode
from storage import open_store
from storage.precision import dequantize, round_to_bf16
from storage.shard_writer import write_all

SPEC_CODECS = {"bytes", "blosc", "zstd", "gzip", "crc32c", "transpose", "sharding_indexed"}


def _codec_names(codecs: list) -> set[str]:
    names = set()
    for codec in codecs:
        names.add(codec["name"])
        names |= _codec_names(codec.get("configuration", {}).get("codecs", []))
        names |= _codec_names(codec.get("configuration", {}).get("index_codecs", []))
    return names


@pytest.mark.parametrize("precision", ["float16", "float32", "bf16_bitround", "int8_per_token"])
def test_tensorstore_reads_every_precision_like_zarr_python(make_job, precision):
    job = make_job(store=StoreOptions(shard_images=4, precision=precision), subset=SubsetSpec(max_images=6))
    path = encode.run(job, progress=False).store_path
    arrays = ["features", "pixels", "image_ids", "valid"] + (
        ["features_scale"] if precision == "int8_per_token" else []
    )
    read = {}
    for name in arrays:
        codecs = json.loads((path / name / "zarr.json").read_text())["codecs"]
        assert _codec_names(codecs) <= SPEC_CODECS, (name, codecs)
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / name)}}
        read[name] = tensorstore.open(spec, read=True).result().read().result()
        np.testing.assert_array_equal(read[name], zarr.open_array(str(path / name), mode="r")[:])
    features = dequantize(read["features"], read.get("features_scale"))
    store = open_store(path)
    np.testing.assert_array_equal(features, store.features())
    as_stored = store.features(np.array([1, 4]), as_stored=True)  # what the train loader moves to the device
    assert as_stored.dtype == (np.float32 if precision == "int8_per_token" else read["features"].dtype)
    np.testing.assert_array_equal(as_stored.astype(np.float32), features[[1, 4]])


def test_bf16_rounding_before_writing_equals_numcodecs_bitround():
    from numcodecs import BitRound

    rng = np.random.default_rng(0)
    values = np.concatenate([
        (rng.standard_normal(100_000) * 10.0 ** rng.integers(-30, 30, 100_000)).astype(np.float32),
        np.array([0.0, -0.0, 1.0, -1.0, 3.4e38, -3.4e38, 1e-40, -1e-45, 1.00390625, 1.01171875], np.float32),
    ])  # fmt: skip
    expected = BitRound(keepbits=7).encode(values).view(np.float32)
    np.testing.assert_array_equal(round_to_bf16(values).view(np.uint32), expected.view(np.uint32))
    relative = np.abs(round_to_bf16(values) - values) / np.maximum(np.abs(values), np.finfo(np.float32).tiny)
    assert relative[np.isfinite(relative) & (np.abs(values) > 1e-30)].max() <= 2.0**-8
    special = np.array([np.nan, np.inf, -np.inf], np.float32)
    out = round_to_bf16(special)
    assert np.isnan(out[0]) and out[1] == np.inf and out[2] == -np.inf


def _inner_compressor(path) -> tuple[str, dict]:
    inner = json.loads((path / "zarr.json").read_text())["codecs"][0]["configuration"]["codecs"]
    return inner[-1]["name"], inner[-1].get("configuration", {})


def test_auto_codecs_are_chosen_per_array_and_a_named_one_applies_to_all():
    from storage.precision import resolve_codecs

    auto = resolve_codecs("float16", "auto", None)
    assert (auto["compressor"], auto["pixel_compressor"]) == ("blosc_lz4", "blosc_lz4")
    bf16 = resolve_codecs("bf16_bitround", "auto", None)
    assert (bf16["compression_level"], bf16["compression_blocksize"]) == (1, 2**20)
    assert resolve_codecs("int8_per_token", "auto", None)["compressor"] == "blosc_lz4"  # zstd saves only 8 %
    assert resolve_codecs("float16", "auto", 2)["compression_level"] == 2
    named = resolve_codecs("float16", "zstd", None)
    assert named == {"compressor": "zstd", "compression_level": 3, "compression_blocksize": 0,
                     "pixel_compressor": "zstd", "pixel_compression_level": 3}  # fmt: skip


def test_a_default_store_holds_lz4_features_and_pixels_and_bf16_features_in_zstd(make_job):
    path = encode.run(make_job(store=StoreOptions(shard_images=4), subset=SubsetSpec(max_images=5)),
                      progress=False).store_path  # fmt: skip
    name, config = _inner_compressor(path / "features")
    assert name == "blosc" and config["cname"] == "lz4"
    name, config = _inner_compressor(path / "pixels")
    assert name == "blosc" and config["cname"] == "lz4"
    assert open_store(path).layout.pixel_compressor == "blosc_lz4"
    path = encode.run(make_job(store=StoreOptions(shard_images=4, precision="bf16_bitround"),
                               subset=SubsetSpec(max_images=5)), progress=False).store_path  # fmt: skip
    name, config = _inner_compressor(path / "features")
    assert name == "blosc" and (config["cname"], config["clevel"], config["blocksize"]) == ("zstd", 1, 2**20)
    assert _inner_compressor(path / "pixels")[1]["cname"] == "lz4"


@pytest.mark.parametrize("compressor", ["auto", "blosc_zstd_shuffle", "zstd", "none"])
def test_the_direct_shard_reader_returns_what_zarr_returns(make_job, compressor):
    job = make_job(
        store=StoreOptions(shard_images=4, compressor=compressor), subset=SubsetSpec(max_images=10)
    )
    store = open_store(encode.run(job, progress=False).store_path)
    assert store._readers == {} and store.features(3) is not None and store._readers["features"] is not None
    everything = zarr.open_array(str(store.path / "features"), mode="r")[:].astype(np.float32)
    for rows in (3, slice(None), slice(2, 9), np.array([9, 0, 4, 4, 8]), np.array([], int)):
        np.testing.assert_array_equal(store.features(rows), everything[rows])
    np.testing.assert_array_equal(
        store.pixels(np.array([7, 1])), zarr.open_array(str(store.path / "pixels"))[[7, 1]]
    )
    np.testing.assert_array_equal(store.image_ids(), zarr.open_array(str(store.path / "image_ids"))[:])


def test_a_shard_file_takes_one_write_call_and_survives_partial_writes(tmp_path, monkeypatch):
    # one call, not one per image: on issue 13's GPU host a write call cost 2.7 ms on average
    pieces = [memoryview(np.full(n, n % 251, np.uint8)).cast("B") for n in [3000, 0, 1, 70000] * 40]
    calls, real_writev = [], os.writev
    monkeypatch.setattr(os, "writev", lambda fd, bufs: calls.append(len(bufs)) or real_writev(fd, bufs))
    fd = os.open(tmp_path / "whole", os.O_WRONLY | os.O_CREAT)
    write_all(fd, list(pieces))
    os.close(fd)
    assert len(calls) == 1 and (tmp_path / "whole").read_bytes() == b"".join(pieces)

    # a kernel that takes at most 4,097 bytes per call: every piece still lands once, in order
    monkeypatch.setattr(os, "writev", lambda fd, bufs: real_writev(fd, [bytes(b"".join(bufs[:2])[:4097])]))
    fd = os.open(tmp_path / "partial", os.O_WRONLY | os.O_CREAT)
    write_all(fd, list(pieces))
    os.close(fd)
    assert (tmp_path / "partial").read_bytes() == b"".join(pieces)
