"""Open, validate and read feature stores, and check their files (format spec: storage/README.md); writing is
storage/writing.py's."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import zarr

from storage import precision as prec
from storage.layout import StoreError, StoreLayout
from storage.shard_reader import ShardReader
from storage.shard_writer import ShardWriter
from storage.writing import RECORDS_FOLDER, StoreWriting, file_sha256  # noqa: F401 (re-exported)

FORMAT_VERSION = 2  # 2: per-shard file checksums and the store's content digest
FORMAT_KEY = "reconlab_store_format"
PER_IMAGE_ARRAYS = ("features", "features_scale", "pixels", "embeddings", "image_ids", "valid")
# How the pixels were decoded (encode.resize, encode.jpeg_draft): a store key holds an option only away from
# these values, the ones of the keys made before the option existed, so those keys stay valid.
DECODING_DEFAULTS = {"resize": "pil", "jpeg_draft": "2x"}


def decoding(key: dict) -> dict[str, str]:
    """The decoding options a store key stands for, those it leaves out included."""
    return {option: key.get(option, older) for option, older in DECODING_DEFAULTS.items()}


def open_store(path: str | Path, *, require_complete: bool = True, mode: str = "r") -> FeatureStore:
    """Open and validate a store: format version, array shapes, and (by default) that every shard is done."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        if not path.exists():
            raise StoreError(f"{path}: no such store (the path does not exist)")
        if path.is_dir() and any(path.iterdir()):  # a store's arrays without its group record
            raise StoreError(f"{path}: not a readable feature store: its zarr.json is missing (deleted?); "
                             "re-encode it (reconlab encode with the config that made it)")  # fmt: skip
        raise StoreError(f"{path}: not a feature store (no zarr.json)")
    try:
        group = zarr.open_group(str(path), mode=mode, zarr_format=3)
    except (ValueError, KeyError, TypeError) as e:  # bad JSON is a ValueError, zarr's metadata errors too
        raise StoreError(
            f"{path}: zarr.json is not a readable Zarr v3 group ({type(e).__name__}: {e}); the store's record "
            "is lost: delete the folder and run `reconlab encode` with the same config"
        ) from e
    version = group.attrs.get(FORMAT_KEY)
    if version != FORMAT_VERSION:
        raise StoreError(
            f"{path}: store format version {version!r}, this reconlab reads version {FORMAT_VERSION}; "
            "re-encode the store with this version"
        )
    store = FeatureStore(path, group)
    store.validate(require_complete=require_complete)
    if require_complete and (damaged := store.damaged_shards()):
        raise StoreError(damaged_message(store, damaged))
    return store


# A shard file of the size written but other bytes: only a full read finds it (damaged_shards(full=True))
CONTENT_CHANGED = "does not match its SHA-256"


def damaged_message(store: FeatureStore, damaged: dict[int, str]) -> str:
    first = next(iter(damaged.items()))
    # The encode stage checks sizes only (hashing a whole store at every run would cost minutes), so a changed
    # content needs the shards taken back first.
    fix = (
        f"run `reconlab store verify {store.path} --repair`, then `reconlab encode` with the same config"
        if any(CONTENT_CHANGED in problem for problem in damaged.values())
        else "run `reconlab encode` with the same config"
    )
    return (
        f"{store.path}: {len(damaged)} finished shard(s) changed on disk since they were written (shard {first[0]}: "
        f"{first[1]}); {fix}: it re-encodes exactly those shards"
    )


class FeatureStore(StoreWriting):
    """Handle on one store; thin on purpose: the arrays are the interface."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path = Path(path)
        self.group = group
        self._verified: set[tuple[str, int]] = set()  # (array, shard) whose file matched its SHA-256 on read
        self._readers: dict[str, ShardReader | None] = {}  # direct shard readers (storage/shard_reader.py)
        self._arrays: dict[str, zarr.Array] = {}
        self._writers: dict[str, ShardWriter | None] = {}  # direct shard writers (storage/shard_writer.py)

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @functools.cached_property
    def layout(self) -> StoreLayout:  # fixed when the store is created
        raw = dict(self.group.attrs["layout"])
        return StoreLayout(**{**raw, "grid_hw": tuple(raw["grid_hw"])})

    @functools.cached_property
    def _per_image_arrays(self) -> list[str]:
        return [name for name in PER_IMAGE_ARRAYS if name in self.group]

    def _array(self, name: str) -> zarr.Array:
        """The array, opened once per handle (a group lookup reads its metadata from disk every time)."""
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    @property
    def config_hash(self) -> str:
        return self.group.attrs["config_hash"]

    @property
    def n_images(self) -> int:
        return self.layout.n_images

    @property
    def content_sha256(self) -> str:
        """Digest of every shard file's SHA-256: what a downstream artifact read (written when complete)."""
        return self.group.attrs["content_sha256"]

    def shard_done(self) -> np.ndarray:
        if self.group.attrs.get(
            "complete"
        ):  # every shard is done (see reopen_shards); zarr reads the flags at
            return np.ones(self.layout.n_shards, bool)  # ~0.5 ms each, ~1 s for COCO's 1,848
        return self._array("shard_done")[:]

    @property
    def complete(self) -> bool:
        return bool(self.group.attrs.get("complete"))

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
        if lay.embedding_dim:
            expected["embeddings"] = (lay.n_images, lay.embedding_dim)
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
        return self._read("image_ids", slice(None))

    def valid(self) -> np.ndarray:
        return self._read("valid", slice(None))

    def _read(self, name: str, rows: slice | np.ndarray | int, out: np.ndarray | None = None) -> np.ndarray:
        self._verify_rows(name, rows)
        if name not in self._readers:
            self._readers[name] = ShardReader.of(self._array(name), self.path / name)
        if out is not None:
            if self._readers[name] is not None and np.ndim(rows) == 1:
                return self._readers[name].read(np.arange(self.layout.n_images)[rows], out)
            out[...] = self._read(name, rows)
            return out
        if (reader := self._readers[name]) is not None:  # the direct path: ~3x faster for one image
            index = np.arange(self.layout.n_images)[rows]
            out = reader.read(np.atleast_1d(index))
            return out[0] if np.ndim(index) == 0 else out
        if isinstance(rows, slice | int | np.integer):
            return self._array(name)[rows]
        # zarr's orthogonal (fancy) indexing on sharded arrays costs ~50x the selection in memory (measured);
        # read the covering slice and select in NumPy instead.
        rows = np.asarray(rows)
        if rows.size == 0:
            return self._array(name)[0:0]
        lo, hi = int(rows.min()), int(rows.max()) + 1
        return self._array(name)[lo:hi][rows - lo]

    def features(
        self,
        rows: slice | np.ndarray | int = slice(None),
        as_stored: bool = False,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Features [n, H, W, D] as float32, whatever the stored precision; `as_stored`: in the stored float dtype
        (float16 stays float16: half the bytes to move, converted where they are used, e.g. on the GPU; int8 with
        per-token scales is always dequantised to float32). `out` (as_stored reads, rows an index array): an
        array to read (or dequantise) into, reused across calls by a loader."""
        if self.layout.precision == "int8_per_token":
            codes = self._read("features", rows)
            if as_stored and out is not None and (out.dtype != np.float32 or out.shape != codes.shape):
                raise ValueError(
                    f"out must be a float32 array of shape {codes.shape}, not {out.dtype} {out.shape}"
                )
            return prec.dequantize(codes, self._read("features_scale", rows), out if as_stored else None)
        if out is not None and as_stored:
            return self._read("features", rows, out)
        stored = self._read("features", rows)
        return stored if as_stored else prec.dequantize(stored, None)

    def int8_codes(self, rows: slice | np.ndarray | int = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """An int8_per_token store's codes [n, H, W, D] and scales [n, H, W] as stored (the values are their
        product): a quarter of float32's bytes to move, multiplied where they are used, e.g. on the GPU."""
        if self.layout.precision != "int8_per_token":
            raise StoreError(f"{self.path}: holds {self.layout.precision} features, not int8 codes")
        return self._read("features", rows), self._read("features_scale", rows)

    def embeddings(self, rows: slice | np.ndarray | int = slice(None)) -> np.ndarray:
        """Pooled image embeddings [n, E] (float32), for stores encoded with encode.embeddings."""
        if not self.layout.embedding_dim:
            raise StoreError(f"{self.path}: this store has no image embeddings (encode it with encode.embeddings: "
                             "true and an encoder with keep_head: true)")  # fmt: skip
        return self._read("embeddings", rows)

    def pixels(
        self, rows: slice | np.ndarray | int = slice(None), out: np.ndarray | None = None
    ) -> np.ndarray:
        if not self.layout.store_pixels:
            raise StoreError(f"{self.path}: this store was written without pixels (store_pixels: false)")
        return self._read("pixels", rows, out)

    def shard_records(self) -> dict[str, dict]:
        """Each done shard's record (key: its index as a string): from `shards`, and for a store still being
        written from its own group in RECORDS_FOLDER."""
        if self.group.attrs.get("complete"):  # gathered: nothing to merge
            return self.group.attrs["shards"]
        records = dict(self.group.attrs.get("shards", {}))
        for path in (self.path / RECORDS_FOLDER).glob("*/zarr.json"):
            records[path.parent.name] = json.loads(path.read_text())["attributes"]
        return records

    # -- integrity -----------------------------------------------------------------------------------------
    def _shard_file(self, name: str, shard: int) -> Path:
        arr = self._array(name)
        return self.path / name / arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))

    def _file_problem(self, name: str, shard: int, recorded: dict | None, full: bool) -> str:
        path = self._shard_file(name, shard)
        if recorded is None:
            return f"{name}: a file appeared where none was written" if path.is_file() else ""
        if not path.is_file():
            return f"{name}: file {path.relative_to(self.path)} is missing"
        if path.stat().st_size != recorded["bytes"]:
            return f"{name}: file {path.relative_to(self.path)} has {path.stat().st_size} bytes, {recorded['bytes']} were written"
        if full and file_sha256(path) != recorded["sha256"]:
            return f"{name}: file {path.relative_to(self.path)} {CONTENT_CHANGED}"
        return ""

    def damaged_shards(self, *, full: bool = False) -> dict[int, str]:
        """Done shards whose files are missing or changed: sizes always, SHA-256 too with `full` (reads it all)."""
        damaged = {}
        done = self.shard_done()
        for key, record in self.shard_records().items():
            shard = int(key)
            if not done[shard]:
                continue
            for name, recorded in record["files"].items():
                if problem := self._file_problem(name, shard, recorded, full):
                    damaged[shard] = problem
                    break
        return damaged

    def _verify_rows(self, name: str, rows: slice | np.ndarray | int) -> None:
        """Check each shard file a read touches against its SHA-256, once per handle."""
        k = self.layout.shard_images
        if isinstance(rows, slice):
            positions = range(self.n_images)[rows]
            shards = range(min(positions) // k, max(positions) // k + 1) if len(positions) else range(0)
        else:
            shards = np.unique(np.atleast_1d(np.asarray(rows)) // k).tolist()
        if all((name, shard) in self._verified for shard in shards):
            return
        records = self.shard_records()
        for shard in shards:
            if (name, shard) in self._verified or str(shard) not in records:
                continue  # a shard not done yet holds fill values; readers must not use its rows
            problem = self._file_problem(name, shard, records[str(shard)]["files"].get(name), full=True)
            if problem:
                raise StoreError(damaged_message(self, {shard: problem}))
            self._verified.add((name, shard))
