"""What the reconstructor's architecture costs and buys: the released architecture (ConvTranspose2d kernel 4)
against the lighter upsampling option (kernel 2), on the demo set with the demo's schedule, plus the size and
CPU step time of each at paper scale (ViT-B/16 at 224 px, synthetic features).
Run:  .venv/bin/python benchmarks/reconstructor_variants.py [--epochs 6]
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from pipeline.config import (
    DatasetSpec,
    EncodeOptions,
    ReconstructorConfig,
    StoreOptions,
    SubsetSpec,
    TrainConfig,
    TransformSpec,
)
from pipeline.config_files import resolve_encoder
from pipeline.data import demo
from pipeline.data.store_info import open_encoded
from pipeline.models.reconstructor import Reconstructor
from pipeline.stages import encode, train

VARIANTS = {
    "released (kernel 4)": ReconstructorConfig(),
    "upsample_kernel 2": ReconstructorConfig(upsample_kernel=2),
}


def matrix_weights(model: nn.Module) -> int:
    return sum(
        m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d | nn.ConvTranspose2d)
    )


def paper_scale_step_seconds(cfg: ReconstructorConfig, batch: int = 8, repeats: int = 3) -> float:
    """Best-of-N seconds of one forward + backward + Adam step at ViT-B/16, 224 px, on this CPU."""
    torch.manual_seed(0)
    model = Reconstructor(cfg, 768, (14, 14), 16, 224)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    feats, target = torch.randn(batch, 14, 14, 768), torch.randn(batch, 3, 224, 224)
    best = float("inf")
    for _ in range(repeats + 1):  # the first step warms up allocators
        start = time.perf_counter()
        loss = ((model(feats) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=6)
    args = p.parse_args()
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="reconlab-variants-"))
    atexit.register(shutil.rmtree, work, True)  # stores of up to a few GB: not left in /tmp
    dataset = DatasetSpec(name="demo", kind="demo", root=demo.build(work / "demo"))
    print(f"# demo set (256 train / 64 val), {args.epochs} epochs, batch 16, lr 1e-3, seed 0, last checkpoint, CPU "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(
        "\n| encoder | variant | matrix/conv weights | train s | val PSNR (dB) | val SSIM |\n|---|---|---|---|---|---|"
    )
    for encoder in ("tiny-vit-64", "tiny-vit-112"):
        stores = {}
        for split in ("train", "val"):
            job = encode.EncodeJob(work / "stores", dataset, split, SubsetSpec(), resolve_encoder(encoder),
                                   TransformSpec(), StoreOptions(), EncodeOptions(num_workers=1))  # fmt: skip
            stores[split] = encode.run(job, progress=False).store_path
        for name, model_cfg in VARIANTS.items():
            cfg = TrainConfig(output_root=work / "train", model=model_cfg, epochs=args.epochs, batch_size=16, lr=1e-3,
                              n_val_images=64, shuffle_buffer_images=64, val_every_steps=10_000)  # fmt: skip
            start = time.perf_counter()
            result = train.run(train.TrainJob(stores["train"], stores["val"], cfg), progress=False)
            seconds = time.perf_counter() - start
            model = train.build_model(cfg, open_encoded(stores["train"]))
            m = result.val_metrics
            print(f"| {encoder} | {name} | {matrix_weights(model):,} | {seconds:.1f} | {m['val_psnr_db']:.2f} | "
                  f"{m['val_ssim']:.4f} |")  # fmt: skip
    print("\n# paper scale: ViT-B/16 at 224 px (D 768, 14x14 tokens), batch 8, one Adam step, best of 3, CPU")
    print("\n| variant | matrix/conv weights | all parameters | step s |\n|---|---|---|---|")
    for name, model_cfg in VARIANTS.items():
        model = Reconstructor(model_cfg, 768, (14, 14), 16, 224)
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"| {name} | {matrix_weights(model):,} | {n_params:,} | {paper_scale_step_seconds(model_cfg):.2f} |"
        )


if __name__ == "__main__":
    main()
