"""The encode stage's store opened for writing: a partial one resumed (damaged shards taken back, a folder left by
a removal under its writer started anew) or a new one created; and the free-space check before the work."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import bars
from pipeline.config import config_hash
from storage import FeatureStore, StoreError, StoreLayout, create, open_store
from storage.creation import remove_abandoned_creations


def open_or_create(path: Path, key: dict, new_store: Callable[[], tuple[StoreLayout, dict]]) -> FeatureStore:
    """The store at `path` (the caller holds its lock), resumed, or created with `new_store()`'s layout and
    attributes (called only then: a layout may probe the encoder)."""
    remove_abandoned_creations(path)  # creations killed before their rename; we hold the lock
    if path.is_dir() and not (path / "zarr.json").is_file():
        # A store is renamed into place whole, so a folder without its zarr.json is what a removal under a
        # running writer left: nothing in it can be read.
        bars.notice(
            f"starting {path.name} anew: its folder has no zarr.json (removed while it was being written?)"
        )
        shutil.rmtree(path)
    if (path / "zarr.json").is_file():
        store = open_store(path, require_complete=False, mode="r+")
        if store.config_hash != config_hash(key):
            raise RuntimeError(f"{path}: holds config {store.config_hash}, expected {config_hash(key)}")
        store.remove_partial_files()
        if damaged := store.damaged_shards():
            bars.notice(f"re-encoding {len(damaged)} damaged shard(s) of {path.name}: {damaged}")
            store.reopen_shards(list(damaged))
        return store
    return create(path, *new_store())


def check_free_space(store: FeatureStore) -> None:
    layout = store.layout
    n_pending = sum(
        len(range(layout.n_images)[layout.shard_slice(int(s))]) for s in np.flatnonzero(~store.shard_done())
    )
    need, free = n_pending * layout.estimated_bytes_per_image(), shutil.disk_usage(store.path).free
    if need > free:
        raise StoreError(
            f"{store.path}: the {n_pending} images still to encode need about {_size(need)}, {_size(free)} "
            "are free there; free space, point store_root at a larger disk, or choose a smaller store.precision"
        )


def _size(n_bytes: float) -> str:
    return tqdm.format_sizeof(n_bytes, "B", 1000)
