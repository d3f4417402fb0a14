"""Train-stage benchmark: does the Zarr loader starve the model, and does memory stay flat as the store grows?

(1) steps/s training from the store (shard reads + shuffle buffer in the loader's worker process, and on a thread)
vs the same batches already in memory, same process; (2) peak RSS of a fixed number of steps on a store and on one 10x larger, each in a
fresh subprocess. Run:  .venv/bin/python benchmarks/train.py [--encoder tiny-vit-112 --n-small 256]
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import DatasetSpec, EncodeOptions, StoreOptions, SubsetSpec, TrainConfig, TransformSpec
from pipeline.config_files import resolve_encoder
from pipeline.data import demo
from pipeline.data.feature_loader import EpochBatches, batch_stream
from pipeline.data.store_info import StoreInfo, open_encoded
from pipeline.stages import encode, train
from storage.inspect import disk_bytes


def make_store(work: Path, encoder: str, n_images: int) -> Path:
    root = demo.build(work / f"demo-{n_images}", n_train=n_images, n_val=8)
    job = encode.EncodeJob(
        work / "stores", DatasetSpec(name=f"demo{n_images}", kind="demo", root=root), "train", SubsetSpec(),
        resolve_encoder(encoder), TransformSpec(), StoreOptions(), EncodeOptions(batch_size=32, num_workers=1),
    )  # fmt: skip
    return encode.run(job, progress=False).store_path


def steps(store_path: Path, cfg: TrainConfig, n_steps: int, path: str) -> tuple[float, float]:
    """(seconds for n_steps optimisation steps, seconds to the loader's first batch). `path`: "resident" (batches
    pre-loaded), or the stage's loader reading in its worker process ("worker", the stage's on a GPU) or on a thread
    of this process ("thread", on the CPU); timed from the first batch, as the loader starts once per training run."""
    store = open_encoded(store_path)
    torch.manual_seed(0)
    model = train.build_model(cfg, store)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = train.lr_schedule(opt, cfg, n_steps + 1)
    pre = StoreInfo.of(store).preprocessing
    device, dtype = torch.device("cpu"), torch.float32

    def batches():
        epoch = 0
        while True:
            yield from batch_stream(store, cfg.batch_size, cfg.seed, epoch, cfg.shuffle_buffer_images)
            epoch += 1

    first_batch_s = float("nan")
    if path == "resident":
        source = batches()
        feed = iter([tuple(map(torch.as_tensor, next(source))) for _ in range(n_steps)])
    else:
        start = time.perf_counter()
        epochs = EpochBatches(store, cfg.batch_size, cfg.seed, range(n_steps), cfg.shuffle_buffer_images,
                              cfg.prefetch_batches, pin=False, workers=int(path == "worker"))  # fmt: skip
        feed = itertools.islice((batch for epoch in range(n_steps) for batch in epochs.of(epoch)), n_steps)
        first = next(feed)
        first_batch_s = time.perf_counter() - start
        feed = itertools.chain([first], feed)
    start = time.perf_counter()
    try:
        for f, p in feed:
            train.train_step(model, opt, sched, f, p, cfg, pre, device, dtype)
        return time.perf_counter() - start, first_batch_s
    finally:
        if path != "resident":
            epochs.close()


def loader_only(store_path: Path, cfg: TrainConfig, n_steps: int) -> float:
    """Seconds to produce n_steps batches from the store with no model: the loader's own ceiling."""
    store = open_encoded(store_path)
    start = time.perf_counter()
    produced = 0
    while produced < n_steps:
        for _ in batch_stream(store, cfg.batch_size, cfg.seed, produced, cfg.shuffle_buffer_images):
            produced += 1
            if produced == n_steps:
                break
    return time.perf_counter() - start


def child(store_path: str, n_steps: int, cfg_json: str) -> None:
    cfg = TrainConfig.model_validate_json(cfg_json)
    seconds, _ = steps(Path(store_path), cfg, n_steps, "thread")  # the stage's loader on the CPU
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--encoder", default="tiny-vit-112")
    p.add_argument("--n-small", type=int, default=256)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", nargs=3, metavar=("STORE", "STEPS", "CFG"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return
    cfg = TrainConfig(batch_size=args.batch_size, shuffle_buffer_images=64)
    work = Path(tempfile.mkdtemp(prefix="reconlab-train-bench-"))
    atexit.register(shutil.rmtree, work, True)  # stores of up to a few GB: not left in /tmp
    small = make_store(work, args.encoder, args.n_small)
    large = make_store(work, args.encoder, 10 * args.n_small)
    print(
        f"# encoder {args.encoder}; stores of {args.n_small} and {10 * args.n_small} images "
        f"({disk_bytes(small) / 1e6:.0f} MB, {disk_bytes(large) / 1e6:.0f} MB); batch {args.batch_size}, "
        f"shuffle buffer {cfg.shuffle_buffer_images}, {args.steps} steps, torch threads {torch.get_num_threads()}"
    )
    steps(large, cfg, 5, "resident")  # warm-up
    # Alternate the paths over rounds and take medians: single runs on this shared machine vary by ~10%.
    paths = ("resident", "worker", "thread")
    rounds = [{path: steps(large, cfg, args.steps, path) for path in paths} for _ in range(args.rounds)]
    seconds = {path: float(np.median([r[path][0] for r in rounds])) for path in paths}
    first = {path: float(np.median([r[path][1] for r in rounds])) for path in paths[1:]}
    t_loader = loader_only(large, cfg, args.steps)
    print(f"\nmedian of {args.rounds} alternating rounds; per-round ratios worker / thread: "
          + ", ".join(f"{r['resident'][0] / r['worker'][0]:.2f} / {r['resident'][0] / r['thread'][0]:.2f}"
                      for r in rounds))  # fmt: skip
    print("\n| data path | steps/s | ratio | first batch (s) |\n|---|---|---|---|")
    print(f"| batches resident in memory | {args.steps / seconds['resident']:.2f} | 1.00 | |")
    for path, name in (
        ("worker", "loader in a worker process (a GPU's)"),
        ("thread", "loader on a thread (the CPU's)"),
    ):
        print(
            f"| streamed from the Zarr store: {name} | {args.steps / seconds[path]:.2f} "
            f"| {seconds['resident'] / seconds[path]:.2f} | {first[path]:.2f} |"
        )
    print(
        f"| loader alone, no model (batches/s) | {args.steps / t_loader:.2f} "
        f"| {seconds['resident'] / t_loader:.2f} | |"
    )
    print("\n| store | images | size on disk | peak RSS (MB) |\n|---|---|---|---|")
    for name, path, n in (("small", small, args.n_small), ("10x larger", large, 10 * args.n_small)):
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(path), str(args.steps), cfg.model_dump_json()],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        rss = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]
        print(f"| {name} | {n} | {disk_bytes(path) / 1e6:.0f} MB | {rss:.0f} |")


if __name__ == "__main__":
    main()
