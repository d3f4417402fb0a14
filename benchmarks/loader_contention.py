"""Does the train loader slow the training loop's own Python work? (CPU; no GPU needed.)

On an H200, training at the paper's batch of 10 at 224 px ran at 0.88 of the rate with the batches already on the
GPU (docs/benchmarks.md, GPU figures, run 2), where every larger step reached 0.95-1.00. Such a step is ~28 ms
of mostly kernel launches: Python work on the main thread. This script stands in a loop of tiny torch ops of
that length for the step (dispatch-bound, as launches are) and times it alone and with the train loader
streaming batches of 10 ViT-B@224 images (features + pixels) three ways: on a thread of the same process (the
train stage before 2026-11-28: `EpochBatches(workers=0)`), in its worker process (the stage now), and, as a
reference, the loop in a process of its own while this one runs the loader.

    .venv/bin/python benchmarks/loader_contention.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.data.feature_loader import EpochBatches  # noqa: E402
from storage import open_store  # noqa: E402
from storage.creation import create  # noqa: E402
from storage.layout import StoreLayout  # noqa: E402
from storage.precision import value_stats  # noqa: E402

BATCH, STEPS, STEP_MS = 10, 60, 25.0


def make_store(path: Path, n: int = 1280) -> None:
    """ViT-B@224-sized float16 features and 224 px pixels, shards of 64, the encode stage's float16 codec."""
    rng = np.random.default_rng(0)
    layout = StoreLayout(n, (14, 14), 768, 224, 64, "float16", "blosc_lz4_shuffle")
    enc = {"name": "synthetic", "backend": "none", "model_id": "synthetic", "weights_id": "random",
           "feature_layer": "last", "grid_hw": [14, 14], "hidden_dim": 768,
           "preprocessing": {"mean": [0.5] * 3, "std": [0.5] * 3}}  # fmt: skip
    store = create(path, layout, {"config_hash": "loader-contention", "encoder": enc})
    for shard in range(layout.n_shards):
        rows = layout.shard_slice(shard)
        m = rows.stop - rows.start
        feats = rng.normal(size=(m, 14, 14, 768)).astype(np.float16)
        pixels = rng.integers(0, 256, (m, 224, 224, 3), dtype=np.uint8)
        store.write_shard(shard, feats, pixels, np.arange(rows.start, rows.stop), np.ones(m, bool),
                          {"n_encoded": m, "failures": [], "stats": value_stats(feats.astype(np.float32))})  # fmt: skip
    store.finalize()


def _ops_per_step() -> int:
    """Tiny ops that take STEP_MS on this machine."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    _step(2000)
    return int(2000 * STEP_MS / ((time.perf_counter() - start) * 1e3))


def _step(n_ops: int) -> None:
    y = torch.zeros(4)
    for _ in range(n_ops):
        y = y.add(1.0)


def steps_ms(n_ops: int, batches=None) -> float:
    """Mean ms of a step's own work (the wait for a batch not counted)."""
    spent = 0.0
    for _ in batches if batches is not None else range(STEPS):
        start = time.perf_counter()
        _step(n_ops)
        spent += time.perf_counter() - start
    return spent / STEPS * 1e3


def _steps_in_own_process(n_ops: int, out) -> None:
    torch.set_num_threads(1)
    out.put(steps_ms(n_ops))


def batches(store_path: Path, workers: int):
    """STEPS batches of the train stage's loader (EpochBatches), with its worker process or on a thread."""
    epochs = EpochBatches(
        open_store(store_path), BATCH, 0, range(100), 4 * BATCH, 4, pin=False, workers=workers
    )
    try:
        yield from itertools.islice((batch for epoch in range(100) for batch in epochs.of(epoch)), STEPS)
    finally:
        epochs.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    n_ops = _ops_per_step()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = Path(tmp) / "store.zarr"
        make_store(store_path)
        print(f"# {n_ops} tiny torch ops per step (~{STEP_MS:.0f} ms alone), {STEPS} steps, batches of {BATCH} "
              "ViT-B@224 images\n\n| repeat | step alone, ms | loader on a thread | ratio | loader in its worker "
              "process (the stage) | ratio | the loop in a process of its own | ratio |\n"
              "|---|---|---|---|---|---|---|---|")  # fmt: skip
        context = multiprocessing.get_context("spawn")
        for repeat in range(args.repeats):
            alone = steps_ms(n_ops)
            threaded = steps_ms(n_ops, batches(store_path, workers=0))
            worker = steps_ms(n_ops, batches(store_path, workers=1))
            results = context.Queue()
            other = context.Process(target=_steps_in_own_process, args=(n_ops, results))
            other.start()
            for _ in batches(store_path, workers=0):  # paced as a training loop paces it
                if not other.is_alive():
                    break
                time.sleep(STEP_MS / 1e3)
            separate = results.get()
            other.join()
            print(f"| {repeat + 1} | {alone:.2f} | {threaded:.2f} | {alone / threaded:.2f} | {worker:.2f} "
                  f"| {alone / worker:.2f} | {separate:.2f} | {alone / separate:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
