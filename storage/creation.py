"""Making a store: every array preallocated with its codecs, all at once or not at all (spec: storage/README.md)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import zarr

from storage import precision as prec
from storage.format import FORMAT_KEY, FORMAT_VERSION, FeatureStore
from storage.layout import StoreError, StoreLayout


def create(path: Path, layout: StoreLayout, attrs: dict) -> FeatureStore:
    """Make an empty store with every array preallocated; rows are filled shard by shard. All-or-nothing: the
    group is built in a hidden sibling folder and renamed into place, so a reader never sees half a store and a
    killed creation leaves only the hidden folder (removed by `remove_abandoned_creations`)."""
    path = Path(path)
    if path.exists():
        raise StoreError(f"{path}: already exists")
    building = path.with_name(f".{path.name}.creating-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    group = zarr.open_group(str(building), mode="w-", zarr_format=3)
    n, (h, w), d, s, k = (
        layout.n_images,
        layout.grid_hw,
        layout.hidden_dim,
        layout.pixel_size,
        layout.shard_images,
    )
    codecs = prec.compressors(layout.compressor, layout.compression_level, layout.compression_blocksize)
    pixel_codecs = prec.compressors(
        layout.pixel_compressor or layout.compressor,
        layout.pixel_compression_level or layout.compression_level,
    )
    dtype, filters = prec.feature_dtype_and_filters(layout.precision)
    # One image per inner chunk (a random read touches ~1 image), k images per shard file (few files, and the
    # unit of resumable work: a shard is written whole by one writer, so no two writers share a shard).
    group.create_array(
        "features", shape=(n, h, w, d), dtype=dtype, chunks=(1, h, w, d), shards=(k, h, w, d),
        filters=filters, compressors=codecs, fill_value=0, dimension_names=("image", "h", "w", "d"),
    )  # fmt: skip
    if layout.precision == "int8_per_token":
        group.create_array(
            "features_scale", shape=(n, h, w), dtype="float32", chunks=(1, h, w), shards=(k, h, w),
            compressors=codecs, fill_value=0, dimension_names=("image", "h", "w"),
        )  # fmt: skip
    if layout.store_pixels:
        group.create_array(
            "pixels", shape=(n, s, s, 3), dtype="uint8", chunks=(1, s, s, 3), shards=(k, s, s, 3),
            compressors=pixel_codecs, fill_value=0, dimension_names=("image", "y", "x", "rgb"),
        )  # fmt: skip
    if layout.embedding_dim:
        e = layout.embedding_dim
        group.create_array(
            "embeddings", shape=(n, e), dtype="float32", chunks=(1, e), shards=(k, e),
            compressors=codecs, fill_value=0, dimension_names=("image", "e"),
        )  # fmt: skip
    for name, dtype in (("image_ids", "int64"), ("valid", "bool")):
        group.create_array(
            name,
            shape=(n,),
            dtype=dtype,
            chunks=(k,),
            compressors=codecs,
            fill_value=0,
            dimension_names=("image",),
        )
    group.create_array(
        "shard_done", shape=(layout.n_shards,), dtype="bool", chunks=(1,), fill_value=False,
        dimension_names=("shard",),
    )  # fmt: skip
    group.attrs.update(
        {
            FORMAT_KEY: FORMAT_VERSION,
            **attrs,
            "layout": {**layout.__dict__, "grid_hw": list(layout.grid_hw)},
            "complete": False,
            "shards": {},
        }
    )
    os.rename(building, path)
    return FeatureStore(path, zarr.open_group(str(path), mode="r+", zarr_format=3))


def remove_abandoned_creations(path: Path) -> int:
    """Hidden folders of creations of `path` that were killed before their rename (call holding the lock)."""
    path = Path(path)
    abandoned = list(path.parent.glob(f".{path.name}.creating-*"))
    for folder in abandoned:
        shutil.rmtree(folder, ignore_errors=True)
    return len(abandoned)
