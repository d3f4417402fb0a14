"""A feature store of random float16 tokens for the benchmarks that need no encoder (tokens, SAE)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storage import open_store  # noqa: E402
from storage.creation import create  # noqa: E402
from storage.layout import StoreLayout  # noqa: E402
from storage.precision import value_stats  # noqa: E402


def make_store(path: Path, n: int, grid: int, dim: int):
    """n images of grid x grid tokens of width dim, N(0, 1) in float16, shards of 64."""
    rng = np.random.default_rng(0)
    layout = StoreLayout(n, (grid, grid), dim, 16, 64, "float16", "blosc_zstd_shuffle")
    enc = {"name": "synthetic", "backend": "none", "model_id": "synthetic", "weights_id": "random", "feature_layer": "last",
           "grid_hw": [grid, grid], "hidden_dim": dim, "preprocessing": {"mean": [0.5] * 3, "std": [0.5] * 3}}  # fmt: skip
    store = create(path, layout, {"config_hash": path.name, "encoder": enc})
    for shard in range(layout.n_shards):
        rows = layout.shard_slice(shard)
        m = rows.stop - rows.start
        feats = rng.normal(size=(m, grid, grid, dim)).astype(np.float16)
        store.write_shard(shard, feats, np.zeros((m, 16, 16, 3), np.uint8), np.arange(rows.start, rows.stop),
                          np.ones(m, bool), {"n_encoded": m, "failures": [], "stats": value_stats(feats.astype(np.float32))})  # fmt: skip
    store.finalize()
    return open_store(path)
