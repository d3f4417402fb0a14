"""SAE stage: training throughput (tokens/s) streaming from a feature store vs the same steps on batches from RAM,
and peak memory of one training epoch when the store grows 10x (it must stay flat: the loader's shuffle buffer, not
the store, bounds it).

Synthetic float16 stores (shards of 64). Throughput: a BatchTopK SAE (expansion 8, k 32) on ViT-B/16@224-sized
tokens (14x14x768), 16 images (3,136 tokens) per step, store first then RAM, each after 3 warm-up steps, one
process. Memory: a separate process per store size trains one epoch and reports its peak RSS. CUDA when present.
Run from the repository root:
    .venv/bin/python benchmarks/sae.py [--images 256] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from synthetic_store import make_store  # noqa: E402

from pipeline.config import SaeConfig  # noqa: E402
from pipeline.data.feature_loader import Prefetcher, batch_stream  # noqa: E402
from pipeline.models import sae_training as st  # noqa: E402
from pipeline.models.sae import training_loss  # noqa: E402

MEMORY_CHILD = """
import json, resource, sys, torch
sys.path.insert(0, {root!r})
from pathlib import Path
import numpy as np
from pipeline.config import SaeConfig
from pipeline.models import sae_training as st
from storage import open_store
store = open_store({store!r})
cfg = SaeConfig(variants=["batchtopk"], k=[32], expansion=8, epochs=1, batch_images=16, shuffle_buffer_images=128)
st.train_sae(st.TokenSource(store, cfg), st.SaeSpec("batchtopk", 32, 0), cfg, Path({out!r}), np.zeros(store.layout.hidden_dim),
             {{"config_hash": "bench"}}, torch.device("cpu"), torch.float32)
print(json.dumps({{"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def rate(batches, sae, optimizer, cfg, device, steps: int) -> float:
    """Tokens/s over `steps` steps (after 3 warm-up steps)."""
    done, start = 0, None
    for i, feats in enumerate(batches):
        if i == 3:
            start, done = time.perf_counter(), 0
        x = st.tokens_of(feats.to(device, non_blocking=True))
        loss, _, codes = training_loss(sae, x, 32, cfg.aux_coefficient, cfg.dead_window)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sae.project_decoder_grad()
        optimizer.step()
        sae.after_step(codes.detach())
        done += len(x)
        if i == steps + 2:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def from_store(store, cfg):
    for epoch in range(1000):
        stream = batch_stream(store, cfg.batch_images, 0, epoch, cfg.shuffle_buffer_images, pixels=False)
        for feats, _ in Prefetcher(stream, 4, pin=torch.cuda.is_available()):
            yield feats


def from_ram(array: np.ndarray, batch: int):
    rng = np.random.default_rng(0)
    while True:
        yield torch.from_numpy(array[np.sort(rng.choice(len(array), batch, replace=False))])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    cfg = SaeConfig(variants=["batchtopk"], k=[32], expansion=8, batch_images=16, shuffle_buffer_images=128)
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp, "vitb.zarr"), args.images, 14, 768)
        torch.manual_seed(0)
        sae = st.build(st.SaeSpec("batchtopk", 32, 0), cfg, 768).to(device)
        optimizer = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=cfg.lr)
        store_rate = rate(from_store(store, cfg), sae, optimizer, cfg, device, args.steps)
        ram_rate = rate(from_ram(store.features(), cfg.batch_images), sae, optimizer, cfg, device, args.steps)
        print(f"# SAE stage, {name}\n")
        print("| tokens (14x14x768), BatchTopK x8, k 32, 16 images/step | tokens/s |\n|---|---|")
        print(f"| from the store | {store_rate:,.0f} |\n| from RAM | {ram_rate:,.0f} |\n"
              f"| store / RAM | {store_rate / ram_rate:.2f} |\n")  # fmt: skip
        print(
            "| store (7x7x384 float16) | images | store MB | peak RSS of one epoch, MB |\n|---|---|---|---|"
        )
        for n in (args.images, 10 * args.images):
            path = Path(tmp, f"mem-{n}.zarr")
            make_store(path, n, 7, 384)
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6
            child = MEMORY_CHILD.format(root=str(ROOT), store=str(path), out=str(Path(tmp, f"sae-{n}")))
            out = subprocess.run(
                [sys.executable, "-c", child], check=True, capture_output=True, text=True
            ).stdout
            peak = json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]
            print(f"| {n} images | {n} | {size:.0f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
