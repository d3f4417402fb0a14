"""Token utility stage: training throughput streaming from a feature store vs the same batches from RAM, and the
inference cost of each selection (learned selector + top-k, random, token norm) and of the completion.

Synthetic float16 stores of two token-grid sizes (the demo's tiny-vit-112, 7x7x192, and ViT-B/16 at 224 px,
14x14x768), shards of 64. Training: the learned selector + completion network (the paper's 3 + 3 layers) for a
fixed number of steps, in one process, store first then RAM, each after a warm-up. Device: CUDA when present.
Run from the repository root:
    .venv/bin/python benchmarks/tokens.py [--images 512] [--steps 30]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from synthetic_store import make_store  # noqa: E402

from pipeline.config import TokensConfig  # noqa: E402
from pipeline.data.feature_loader import Prefetcher, batch_stream, widen  # noqa: E402
from pipeline.models import token_training as tt  # noqa: E402
from pipeline.models.token_selector import n_kept, norm_mask, random_mask, top_k_mask  # noqa: E402

SHAPES = {"tiny-vit-112 (7x7x192)": (7, 192, 192), "ViT-B/16@224 (14x14x768)": (14, 768, 256)}


def train_rate(batches, model, optimizer, cfg, spec, device, steps: int) -> float:
    """Images/s over `steps` optimisation steps drawn from `batches` (after 3 warm-up steps)."""
    done, start = 0, None
    for i, feats in enumerate(batches):
        if i == 3:
            start, done = time.perf_counter(), 0
        tokens = widen(feats.to(device, non_blocking=True)).flatten(1, 2)
        loss, _, _ = tt.step_loss(model, tokens, spec, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done += len(tokens)
        if i == steps + 2:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def from_store(store, cfg, epochs: int = 100):
    for epoch in range(epochs):
        stream = batch_stream(store, cfg.batch_size, cfg.seed, epoch, cfg.shuffle_buffer_images, pixels=False)
        for feats, _ in Prefetcher(stream, 4, pin=torch.cuda.is_available()):
            yield feats


def from_ram(array: np.ndarray, batch: int):
    rng = np.random.default_rng(0)
    while True:
        yield torch.from_numpy(array[np.sort(rng.choice(len(array), batch, replace=False))])


@torch.no_grad()
def selection_ms(model, tokens: torch.Tensor, k: int, device) -> dict:
    def timed(fn, repeats: int = 10) -> float:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return 1e3 * (time.perf_counter() - start) / repeats / len(tokens)

    keep = top_k_mask(model.keep_logits(tokens), k)
    generator = torch.Generator().manual_seed(0)
    return {
        "learned: selector + top-k": timed(lambda: top_k_mask(model.keep_logits(tokens), k)),
        "random": timed(lambda: random_mask(len(tokens), tokens.shape[1], k, generator)),
        "token norm": timed(lambda: norm_mask(tokens, k)),
        "completion network": timed(lambda: model.complete(tokens, keep)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"# token utility stage, {name}, {args.images} images per store, {args.steps} timed steps, batch 32\n"
    )
    print("| features | width | store img/s | RAM img/s | store / RAM | learned: selector + top-k ms/img | "
          "random ms/img | norm ms/img | completion ms/img |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for label, (grid, dim, width) in SHAPES.items():
        with tempfile.TemporaryDirectory() as tmp:
            store = make_store(Path(tmp, "s.zarr"), args.images, grid, dim)
            cfg = TokensConfig(fractions=[0.5], network={"width": width}, shuffle_buffer_images=128)
            spec = tt.NetworkSpec("learned", 0.5)
            torch.manual_seed(0)
            model = tt.build(spec, cfg, dim, grid * grid).to(device)
            optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
            store_rate = train_rate(from_store(store, cfg), model, optimizer, cfg, spec, device, args.steps)
            ram = store.features()
            ram_rate = train_rate(
                from_ram(ram, cfg.batch_size), model, optimizer, cfg, spec, device, args.steps
            )
            model.eval()
            tokens = torch.from_numpy(ram[:64]).to(device).float().flatten(1, 2)
            ms = selection_ms(model, tokens, n_kept(0.5, grid * grid), device)
        print(f"| {label} | {width} | {store_rate:.0f} | {ram_rate:.0f} | {store_rate / ram_rate:.2f} | "
              + " | ".join(f"{v:.3f}" for v in ms.values()) + " |")  # fmt: skip


if __name__ == "__main__":
    main()
