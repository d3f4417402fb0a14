"""Writing a feature store: whole shards, their records, the finished store's summary, and taking shards back
(the protocol: storage/README.md, "Writing and resuming")."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from storage import precision as prec
from storage.shard_writer import ShardWriter, check_still_there

if TYPE_CHECKING:
    from storage.format import FeatureStore

# While a store is written, each done shard's record is the attributes of a Zarr group of its own here
# (`shard_records/{s}/zarr.json`: the store stays a Zarr hierarchy); `finalize` gathers them into the `shards`
# attribute. Rewriting `shards` whole per shard grew with every shard: 289 ms per shard at the end of COCO's
# 1,848 (benchmarks/store_writes.py).
RECORDS_FOLDER = "shard_records"
_EMPTY_GROUP = {"zarr_format": 3, "node_type": "group", "attributes": {}}


class StoreWriting:
    """FeatureStore's writing half (its handle state, array lookups and file paths are FeatureStore's)."""

    def write_shard(
        self,
        shard: int,
        features_nhwd: np.ndarray,
        pixels_nhwc: np.ndarray | None,
        image_ids: np.ndarray,
        valid: np.ndarray,
        shard_record: dict,
        pixels_like: FeatureStore | None = None,
        embeddings_ne: np.ndarray | None = None,
        quantized: bool = False,
        features_scale: np.ndarray | None = None,
    ) -> None:
        """Write one whole shard, then its record, then mark it done: 'done' is never ahead of the data.

        pixels_like: a store holding these very pixels in this shard, with the same pixel array metadata: its
        shard file is hard-linked (copied across file systems) instead of compressing the pixels again.
        quantized: `features_nhwd` (and `features_scale`, int8_per_token) already hold what
        `precision.quantize` gives, as the encode stage makes them on its device; otherwise float32 features."""
        check_still_there(self.path)
        rows = self.layout.shard_slice(shard)
        for reader in self._readers.values():
            if reader is not None:
                reader.forget(shard)
        if quantized:
            stored, scale = features_nhwd, features_scale
            dtype, _ = prec.feature_dtype_and_filters(self.layout.precision)
            if stored.dtype != dtype or (scale is None) != (self.layout.precision != "int8_per_token"):
                raise ValueError(f"shard {shard}: quantized features of dtype {stored.dtype} (scale given: "
                                 f"{scale is not None}) are not {self.layout.precision}'s")  # fmt: skip
        else:
            stored, scale = prec.quantize(features_nhwd, self.layout.precision)
        if pixels_nhwc is not None and pixels_like is not None and self._link_pixels(pixels_like, shard):
            pixels_nhwc = None
        written = {}
        for name, values in (("features", stored), ("features_scale", scale), ("pixels", pixels_nhwc),
                             ("embeddings", embeddings_ne)):  # fmt: skip
            if values is None:
                continue
            if name not in self._writers:
                self._writers[name] = ShardWriter.of(self._array(name), self.path / name)
            if (writer := self._writers[name]) is not None:
                written[name] = writer.write(shard, values)
            else:
                self._array(name)[rows] = values
        self._array("image_ids")[rows] = image_ids
        self._array("valid")[rows] = valid
        files = self._file_records(shard, written)
        records = self.path / RECORDS_FOLDER
        if not (records / "zarr.json").is_file():
            _write_json(records / "zarr.json", _EMPTY_GROUP)
        _write_json(
            records / str(shard) / "zarr.json",
            {**_EMPTY_GROUP, "attributes": {**shard_record, "files": files}},
        )
        self._array("shard_done")[shard] = True

    def _link_pixels(self, source: FeatureStore, shard: int) -> bool:
        """Place `source`'s pixel shard file here; False (nothing done) when it cannot stand for ours."""
        src, dst = source._shard_file("pixels", shard), self._shard_file("pixels", shard)
        if not src.is_file() or source.group["pixels"].metadata != self.group["pixels"].metadata:
            return False
        dst.parent.mkdir(parents=True, exist_ok=True)
        partial = dst.with_name(f"{dst.name}.{os.getpid()}.partial")
        try:
            os.link(src, partial)
        except OSError:  # another file system, or links not allowed
            shutil.copyfile(src, partial)
        os.replace(partial, dst)
        return True

    def finalize(self) -> dict:
        """Roll the per-shard records up into the store's summary attributes and mark it complete."""
        shards = dict(sorted(self.shard_records().items(), key=lambda kv: int(kv[0])))
        n_tokens = sum(r["stats"]["n_tokens"] for r in shards.values())
        summary = {
            "n_encoded": sum(r["n_encoded"] for r in shards.values()),
            "n_failed": sum(len(r["failures"]) for r in shards.values()),
            "failures": [f for r in shards.values() for f in r["failures"]],
            "feature_stats": {
                "max_abs": max((r["stats"]["max_abs"] for r in shards.values()), default=0.0),
                "n_nonfinite": sum(r["stats"]["n_nonfinite"] for r in shards.values()),
                "n_over_float16_max": sum(r["stats"]["n_over_float16_max"] for r in shards.values()),
                "mean_token_norm": sum(r["stats"]["sum_token_norm"] for r in shards.values())
                / max(n_tokens, 1),
            },
            "content_sha256": hashlib.sha256(
                json.dumps({k: r["files"] for k, r in shards.items()}, sort_keys=True).encode()
            ).hexdigest(),
            "complete": True,
        }
        self.group.attrs.update({"shards": shards, **summary})
        shutil.rmtree(self.path / RECORDS_FOLDER, ignore_errors=True)  # now in `shards`
        return summary

    def _file_records(self, shard: int, written: dict | None = None) -> dict:
        """Per array, the shard file's size and SHA-256 (None: zarr wrote no file, every value is the fill);
        `written`: those already known from writing."""
        records = dict(written or {})
        for name in self._per_image_arrays:
            if name not in records:
                path = self._shard_file(name, shard)
                records[name] = (
                    {"bytes": path.stat().st_size, "sha256": file_sha256(path)} if path.is_file() else None
                )
        return records

    def reopen_shards(self, shards: list[int]) -> None:
        """Mark damaged shards as not done, so the encode stage writes them again. `complete` is cleared first, so
        that at every moment it promises every shard is done; their old records go last (a record kept by a
        crash in between is replaced when its shard is written again)."""
        self.group.attrs["complete"] = False
        for shard in shards:
            self._array("shard_done")[shard] = False
            shutil.rmtree(self.path / RECORDS_FOLDER / str(shard), ignore_errors=True)
        records = dict(self.group.attrs.get("shards", {}))
        for shard in shards:
            records.pop(str(shard), None)
        self.group.attrs["shards"] = records

    def remove_partial_files(self) -> int:
        """Temp files a killed writer can leave beside chunk files."""
        removed = 0
        for partial in self.path.rglob("*.partial"):
            partial.unlink(missing_ok=True)
            removed += 1
        return removed


def _write_json(path: Path, doc: dict) -> None:
    """All or nothing: under a temp name (one per thread: writers of two shards may both write the parent group),
    then renamed into place."""
    path.parent.mkdir(exist_ok=True)  # not its parents: a store removed under a writer is not made again
    partial = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    partial.write_text(json.dumps(doc))
    os.replace(partial, path)


def file_sha256(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()
