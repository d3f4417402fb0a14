"""The most images per second the encode stage can ever feed a model: the stage with a stand-in encoder that
costs nothing (its forward returns a prepared ViT-B-shaped feature batch), on COCO-sized JPEGs (640x480, made from
scikit-image's photos), with 1 and 2 decode workers; and where one image's time goes, measured in this process:
decode (JPEG with draft), resize + crop, compression + write of its features and pixels. No GPU here: the
host-to-device copy is not measured.
    .venv/bin/python benchmarks/encode_ceiling.py [--images 256] [--resolution 224]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.config import (
    DatasetSpec,
    EncodeOptions,
    EncoderSpec,
    SplitSpec,
    StoreOptions,
    SubsetSpec,
    TransformSpec,
)
from pipeline.data.images import load_rgb
from pipeline.jobs import EncodeJob
from pipeline.models import encoders
from pipeline.stages import encode
from storage import StoreLayout, create
from storage.precision import resolve_codecs


def coco_sized_jpegs(folder: Path, n: int) -> None:
    from skimage import data

    photos = [
        getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
    ]
    folder.mkdir(parents=True)
    for i in range(n):
        photo = (
            Image.fromarray(photos[i % len(photos)])
            .convert("RGB")
            .resize((640, 480), Image.Resampling.BICUBIC)
        )
        photo.rotate(i % 7, expand=False).save(folder / f"{i:06d}.jpg", quality=90)


# The defaults (torch resize, per-array codecs) against what encoded stores before them (PIL, blosc zstd 3).
SETTINGS = {"defaults": ("torch", "auto"), "before 2026-11-27": ("pil", "blosc_zstd_shuffle")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--resolution", type=int, default=224)
    args = parser.parse_args()
    s, grid, width = args.resolution, args.resolution // 16, 768
    stand_in = torch.from_numpy(np.random.default_rng(0).standard_normal((64, grid, grid, width), np.float32))
    real = encoders.Encoder.encode_layers
    encoders.Encoder.encode_layers = lambda self, x, layers: [
        stand_in[: len(x)] for _ in layers
    ]  # costs nothing
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        coco_sized_jpegs(tmp / "images", args.images)
        dataset = DatasetSpec(
            name="jpegs", kind="folder", root=tmp, splits={"all": SplitSpec(images_dir=tmp / "images")}
        )
        spec = EncoderSpec(name="stand-in", backend="timm", model_id="vit_base_patch16_224", resolution=s,
                           patch_size=16, preprocessing_source="timm_pretrained_cfg", weights="random")  # fmt: skip
        rows = {}
        for setting, (resize, compressor) in SETTINGS.items():
            for workers in (1, 2):
                job = EncodeJob(tmp / f"stores-{workers}-{resize}", dataset, "all", SubsetSpec(), spec,
                                TransformSpec(), StoreOptions(compressor=compressor),
                                EncodeOptions(batch_size=32, num_workers=workers, device="cpu", resize=resize))  # fmt: skip
                start = time.perf_counter()
                encode.run(job, progress=False)
                rows[setting, workers] = args.images / (time.perf_counter() - start)
        encoders.Encoder.encode_layers = real
        pre = encoders.load(spec, device="cpu").preprocessing
        paths = sorted((tmp / "images").glob("*.jpg"))[:64]
        start = time.perf_counter()
        decoded = [load_rgb(p, min_side=16, max_pixels=10**9, draft_to=2 * s) for p in paths]
        steps = {"decode JPEG (PIL, draft)": (time.perf_counter() - start) / len(paths)}
        for resize, compressor in SETTINGS.values():
            start = time.perf_counter()
            pixels = np.stack([pre.to_pixels(img, resize) for img in decoded])
            steps[f"resize + crop ({resize})"] = (time.perf_counter() - start) / len(paths)
            layout = StoreLayout(n_images=64, grid_hw=(grid, grid), hidden_dim=width, pixel_size=s, shard_images=64,
                                 precision="float16", store_pixels=True, **resolve_codecs("float16", compressor, None))  # fmt: skip
            target = create(tmp / f"write-test-{resize}.zarr", layout, {})
            start = time.perf_counter()
            target.write_shard(0, stand_in[:64].numpy(), pixels, np.arange(64), np.ones(64, bool),
                               {"n_encoded": 64, "failures": [], "stats": {}})  # fmt: skip
            steps[f"compress + write features and pixels ({compressor})"] = (time.perf_counter() - start) / 64
    print(f"# encode stage ceiling: stand-in encoder, {args.images} JPEGs 640x480 -> {s} px, ViT-B-shaped float16 "
          f"features ({grid}x{grid}x{width}), CPU, torch threads {torch.get_num_threads()}\n")  # fmt: skip
    print("| setting | 1 decode worker, images/s | 2 decode workers, images/s |\n|---|---|---|")
    for setting in SETTINGS:
        print(f"| {setting} | {rows[setting, 1]:.0f} | {rows[setting, 2]:.0f} |")
    print("\n| step (one image, this process) | ms |\n|---|---|")
    for name, t in steps.items():
        print(f"| {name} | {1e3 * t:.2f} |")
    decode_s = steps["decode JPEG (PIL, draft)"]
    for setting, (resize, compressor) in SETTINGS.items():
        per_image = decode_s + steps[f"resize + crop ({resize})"]
        write_s = steps[f"compress + write features and pixels ({compressor})"]
        print(
            f"\n{setting}: per core, decode + resize {1 / per_image:.0f} images/s, compress + write "
            f"{1 / write_s:.0f} images/s, all steps on one core {1 / (per_image + write_s):.0f} images/s"
        )


if __name__ == "__main__":
    main()
