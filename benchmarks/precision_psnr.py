"""Does the feature store's precision change what a reconstructor learns? Same encoder, same images, same training
schedule and seed; only `store.precision` differs. Prints val PSNR / SSIM per precision and bytes per image.
Run:  .venv/bin/python benchmarks/precision_psnr.py [--encoder tiny-vit-112 --epochs 6]
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import tempfile
from pathlib import Path

from pipeline.config import DatasetSpec, EncodeOptions, StoreOptions, SubsetSpec, TrainConfig, TransformSpec
from pipeline.config_files import resolve_encoder
from pipeline.data import demo
from pipeline.stages import encode, train
from storage.inspect import disk_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--encoder", default="tiny-vit-112")
    p.add_argument("--epochs", type=int, default=6)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="reconlab-precision-"))
    atexit.register(shutil.rmtree, work, True)  # stores of up to a few GB: not left in /tmp
    dataset = DatasetSpec(name="demo", kind="demo", root=demo.build(work / "demo"))
    spec = resolve_encoder(args.encoder)
    cfg = TrainConfig(output_root=work / "train", epochs=args.epochs, batch_size=16, lr=1e-3, n_val_images=64,
                      shuffle_buffer_images=64, val_every_steps=10_000)  # fmt: skip
    print(f"# {args.encoder}, demo set (256 train / 64 val), {args.epochs} epochs, batch 16, lr 1e-3, seed 0")
    print("\n| precision | feature bytes/image | val PSNR (dB) | val SSIM | val MSE |\n|---|---|---|---|---|")
    for precision in ("float32", "float16", "bf16_bitround", "int8_per_token"):
        stores = {}
        for split in ("train", "val"):
            job = encode.EncodeJob(work / "stores", dataset, split, SubsetSpec(), spec, TransformSpec(),
                                   StoreOptions(precision=precision), EncodeOptions(num_workers=1))  # fmt: skip
            stores[split] = encode.run(job, progress=False).store_path
        m = train.run(train.TrainJob(stores["train"], stores["val"], cfg), progress=False).val_metrics
        n = 256
        size = disk_bytes(stores["train"] / "features") + (
            disk_bytes(stores["train"] / "features_scale")
            if (stores["train"] / "features_scale").exists()
            else 0
        )
        print(
            f"| {precision} | {size / n:,.0f} | {m['val_psnr_db']:.3f} | {m['val_ssim']:.4f} | {m['val_mse']:.5f} |"
        )


if __name__ == "__main__":
    main()
