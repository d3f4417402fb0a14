"""What writing one shard costs beyond compressing it, as a store grows to paper scale (COCO train: 118,287
images, 1,848 shards of 64):
- write system calls per shard (/proc/self/io) and ms per shard, for a shard of ViT-B@224-sized float16 features
  and 224 px pixels;
- the ms of a shard's bookkeeping (ids, valid, record, done mark) early and late in a 1,848-shard store, with
  tiny features so that only the bookkeeping is timed, and the s to open that store once finished.

    .venv/bin/python benchmarks/store_writes.py [--shards 1848]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storage import open_store  # noqa: E402
from storage.creation import create  # noqa: E402
from storage.layout import StoreLayout  # noqa: E402
from storage.precision import resolve_codecs, value_stats  # noqa: E402


def write_syscalls() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("syscw"))


def write_shards(
    folder: Path, n_shards: int, grid: int, width: int, side: int
) -> tuple[list, list, float, float]:
    """Write every shard of a float16 store of shards of 64: ms and write calls per shard, the finalize's s, and
    the s to open the finished store (what every later stage and `store inspect` pay)."""
    k = 64
    layout = StoreLayout(n_images=k * n_shards, grid_hw=(grid, grid), hidden_dim=width, pixel_size=side,
                         shard_images=k, precision="float16", store_pixels=True,
                         **resolve_codecs("float16", "auto", None))  # fmt: skip
    encoder = {"name": "synthetic", "backend": "none", "model_id": "synthetic", "weights_id": "random",
               "feature_layer": "last", "grid_hw": [grid, grid], "hidden_dim": width}  # fmt: skip
    rng = np.random.default_rng(0)
    features = rng.normal(size=(k, grid, grid, width)).astype(np.float16)
    pixels = rng.integers(0, 256, (k, side, side, 3), dtype=np.uint8)
    record = {"n_encoded": k, "failures": [], "stats": value_stats(features.astype(np.float32))}
    store = create(folder, layout, {"config_hash": folder.name, "encoder": encoder})
    ms, calls = [], []
    for shard in range(n_shards):
        before, start = write_syscalls(), time.perf_counter()
        store.write_shard(shard, features, pixels, np.arange(shard * k, (shard + 1) * k), np.ones(k, bool),
                          record, quantized=True)  # fmt: skip
        ms.append(1e3 * (time.perf_counter() - start))
        calls.append(write_syscalls() - before)
    start = time.perf_counter()
    store.finalize()
    finalize_s = time.perf_counter() - start
    start = time.perf_counter()
    open_store(folder)
    return ms, calls, finalize_s, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=1848)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ms, calls, _, _ = write_shards(Path(tmp) / "vit-b.zarr", 8, 14, 768, 224)
        print(
            f"ViT-B@224 shard (64 images, float16 + 224 px pixels): {np.median(calls):.0f} write calls, "
            f"{np.median(ms):.1f} ms (median of 8 shards)\n"
        )
        ms, calls, finalize_s, open_s = write_shards(Path(tmp) / "scale.zarr", args.shards, 2, 8, 4)
    print(f"| shards | bookkeeping ms per shard, first 100 | last 100 | all shards, s | finalize, s | open, s |\n"
          f"|---|---|---|---|---|---|\n| {args.shards} | {np.median(ms[:100]):.1f} | {np.median(ms[-100:]):.1f} | "
          f"{sum(ms) / 1e3:.1f} | {finalize_s:.2f} | {open_s:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
