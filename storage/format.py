"""Create, open, validate, write and read feature stores (format spec: storage/README.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from storage import precision as prec

FORMAT_VERSION = 1
FORMAT_KEY = "reconlab_store_format"


class StoreError(RuntimeError):
    """A store that is missing, incomplete, or does not match what its reader expects."""


class StoreLocked(StoreError):
    """Another process is writing this store."""


@dataclass(frozen=True)
class StoreLayout:
    n_images: int
    grid_hw: tuple[int, int]
    hidden_dim: int
    pixel_size: int
    shard_images: int
    precision: str
    compressor: str
    store_pixels: bool = True
    compression_level: int = 3

    @property
    def n_shards(self) -> int:
        return -(-self.n_images // self.shard_images)

    def shard_slice(self, shard: int) -> slice:
        return slice(shard * self.shard_images, min((shard + 1) * self.shard_images, self.n_images))


def create(path: Path, layout: StoreLayout, attrs: dict) -> FeatureStore:
    """Make an empty store with every array preallocated; rows are filled shard by shard."""
    path = Path(path)
    group = zarr.open_group(str(path), mode="w-", zarr_format=3)
    n, (h, w), d, s, k = (
        layout.n_images,
        layout.grid_hw,
        layout.hidden_dim,
        layout.pixel_size,
        layout.shard_images,
    )
    codecs = prec.compressors(layout.compressor, layout.compression_level)
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
            compressors=codecs, fill_value=0, dimension_names=("image", "y", "x", "rgb"),
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
    return FeatureStore(path, group)


def open_store(path: str | Path, *, require_complete: bool = True, mode: str = "r") -> FeatureStore:
    """Open and validate a store: format version, array shapes, and (by default) that every shard is done."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise StoreError(f"{path}: not a feature store (no zarr.json)")
    group = zarr.open_group(str(path), mode=mode, zarr_format=3)
    version = group.attrs.get(FORMAT_KEY)
    if version != FORMAT_VERSION:
        raise StoreError(
            f"{path}: store format version {version!r}, this reconlab reads version {FORMAT_VERSION}; "
            "re-encode the store with this version"
        )
    store = FeatureStore(path, group)
    store.validate(require_complete=require_complete)
    return store


class FeatureStore:
    """Handle on one store; thin on purpose: the arrays are the interface."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path = Path(path)
        self.group = group

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def layout(self) -> StoreLayout:
        raw = dict(self.group.attrs["layout"])
        return StoreLayout(**{**raw, "grid_hw": tuple(raw["grid_hw"])})

    @property
    def config_hash(self) -> str:
        return self.group.attrs["config_hash"]

    @property
    def n_images(self) -> int:
        return self.layout.n_images

    def shard_done(self) -> np.ndarray:
        return self.group["shard_done"][:]

    @property
    def complete(self) -> bool:
        return bool(self.group.attrs.get("complete")) and bool(self.shard_done().all())

    def validate(self, *, require_complete: bool) -> None:
        lay = self.layout
        h, w = lay.grid_hw
        expected = {
            "features": (lay.n_images, h, w, lay.hidden_dim),
            "image_ids": (lay.n_images,),
            "valid": (lay.n_images,),
            "shard_done": (lay.n_shards,),
        }
        if lay.store_pixels:
            expected["pixels"] = (lay.n_images, lay.pixel_size, lay.pixel_size, 3)
        if lay.precision == "int8_per_token":
            expected["features_scale"] = (lay.n_images, h, w)
        for name, shape in expected.items():
            if name not in self.group:
                raise StoreError(f"{self.path}: array '{name}' is missing")
            if tuple(self.group[name].shape) != shape:
                raise StoreError(
                    f"{self.path}: array '{name}' has shape {self.group[name].shape}, expected {shape}"
                )
        if require_complete and not self.complete:
            done = self.shard_done()
            raise StoreError(
                f"{self.path}: store is incomplete ({int(done.sum())}/{done.size} shards done); "
                "re-run `reconlab encode` with the same config to finish it"
            )

    # -- reading -------------------------------------------------------------------------------------------
    def image_ids(self) -> np.ndarray:
        return self.group["image_ids"][:]

    def valid(self) -> np.ndarray:
        return self.group["valid"][:]

    def _read(self, name: str, rows: slice | np.ndarray | int) -> np.ndarray:
        if isinstance(rows, slice | int | np.integer):
            return self.group[name][rows]
        # zarr's orthogonal (fancy) indexing on sharded arrays costs ~50x the selection in memory (measured);
        # read the covering slice and select in NumPy instead.
        rows = np.asarray(rows)
        if rows.size == 0:
            return self.group[name][0:0]
        lo, hi = int(rows.min()), int(rows.max()) + 1
        return self.group[name][lo:hi][rows - lo]

    def features(self, rows: slice | np.ndarray | int = slice(None)) -> np.ndarray:
        """Features as float32 [n, H, W, D], whatever the stored precision."""
        stored = self._read("features", rows)
        scale = self._read("features_scale", rows) if "features_scale" in self.group else None
        return prec.dequantize(stored, scale)

    def pixels(self, rows: slice | np.ndarray | int = slice(None)) -> np.ndarray:
        if "pixels" not in self.group:
            raise StoreError(f"{self.path}: this store was written without pixels (store_pixels: false)")
        return self._read("pixels", rows)

    # -- writing -------------------------------------------------------------------------------------------
    def write_shard(
        self,
        shard: int,
        features_nhwd: np.ndarray,
        pixels_nhwc: np.ndarray | None,
        image_ids: np.ndarray,
        valid: np.ndarray,
        shard_record: dict,
    ) -> None:
        """Write one whole shard, then its record, then mark it done: 'done' is never ahead of the data."""
        rows = self.layout.shard_slice(shard)
        stored, scale = prec.quantize(features_nhwd, self.layout.precision)
        self.group["features"][rows] = stored
        if scale is not None:
            self.group["features_scale"][rows] = scale
        if pixels_nhwc is not None:
            self.group["pixels"][rows] = pixels_nhwc
        self.group["image_ids"][rows] = image_ids
        self.group["valid"][rows] = valid
        shards = dict(self.group.attrs.get("shards", {}))
        shards[str(shard)] = shard_record
        self.group.attrs["shards"] = shards
        self.group["shard_done"][shard] = True

    def finalize(self) -> dict:
        """Roll the per-shard records up into the store's summary attributes and mark it complete."""
        shards = self.group.attrs["shards"]
        n_tokens = sum(r["stats"]["n_tokens"] for r in shards.values())
        summary = {
            "n_encoded": sum(r["n_encoded"] for r in shards.values()),
            "n_failed": sum(len(r["failures"]) for r in shards.values()),
            "failures": [
                f for _, r in sorted(shards.items(), key=lambda kv: int(kv[0])) for f in r["failures"]
            ],
            "feature_stats": {
                "max_abs": max((r["stats"]["max_abs"] for r in shards.values()), default=0.0),
                "n_nonfinite": sum(r["stats"]["n_nonfinite"] for r in shards.values()),
                "n_over_float16_max": sum(r["stats"]["n_over_float16_max"] for r in shards.values()),
                "mean_token_norm": sum(r["stats"]["sum_token_norm"] for r in shards.values())
                / max(n_tokens, 1),
            },
            "complete": True,
        }
        self.group.attrs.update(summary)
        return summary

    def remove_partial_files(self) -> int:
        """Temp files a killed writer can leave beside chunk files."""
        removed = 0
        for partial in self.path.rglob("*.partial"):
            partial.unlink(missing_ok=True)
            removed += 1
        return removed
