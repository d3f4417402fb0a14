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
from pipeline.data.images import decode_for_encoder, draft_side, load_rgb, load_rgb_array
from pipeline.data.store_writer import add_batch, shard_buffer
from pipeline.jobs import EncodeJob
from pipeline.models import encoders
from pipeline.stages import encode
from storage import StoreLayout, create
from storage.precision import compressors, quantize, resolve_codecs, value_stats
from storage.shard_writer import numcodecs_codec


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


# (resize, compressor, precision, jpeg_draft): the defaults (torch resize, per-array codecs) against what encoded
# stores before them (PIL, blosc zstd 3); JPEGs decoded at the DCT scale nearest the encoder's side
# (encode.jpeg_draft: 1x); bf16_bitround (configs/coco.yaml's precision) under auto's codec and the one auto used
# first (zstd 7 in blosc's own blocks, rounding on the writer thread in NumPy).
SETTINGS = {
    "defaults": ("torch", "auto", "float16", "2x"),
    "jpeg_draft 1x": ("torch", "auto", "float16", "1x"),
    "before 2026-11-27": ("pil", "blosc_zstd_shuffle", "float16", "2x"),
    "bf16_bitround": ("torch", "auto", "bf16_bitround", "2x"),
    "bf16_bitround (auto's first codec)": ("torch", "blosc_zstd_shuffle", "bf16_bitround", "2x"),
}
WRITER_THREADS = {
    "defaults": 1,
    "defaults, 2 writer threads": 2,
    "jpeg_draft 1x": 1,
    "jpeg_draft 1x, 2 writer threads": 2,
    "before 2026-11-27": 1,
    "bf16_bitround": 1,
    "bf16_bitround (auto's first codec)": 1,
}


def per_image(fn, n: int, reps: int = 3) -> float:
    """Seconds per image, best of `reps` (this shared machine's noise is mostly upward)."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) / n


def pil_array(path: Path, **limits) -> np.ndarray:
    """The stage's decoder before 2026-11-28: PIL all the way (load_rgb_array's fallback)."""
    return np.array(load_rgb(path, **limits))


def decode_then_resize(
    paths: list[Path], pre, resize: str, draft_to: int, load=load_rgb_array, reps: int = 3
) -> tuple[float, float]:
    """Seconds per image to decode and to resize + crop, taken image by image as a decode worker runs them (each
    resize finds its image still in cache); the best of `reps` passes. `load`: the stage's decoder, or PIL's."""
    best = (float("inf"), float("inf"))
    for _ in range(reps):
        decode = resized = 0.0
        for path in paths:
            start = time.perf_counter()
            img = load(path, min_side=16, max_pixels=10**9, draft_to=draft_to)
            middle = time.perf_counter()
            pre.to_pixels(img, resize)
            decode, resized = decode + middle - start, resized + time.perf_counter() - middle
        best = min(best, (decode, resized), key=sum)
    return best[0] / len(paths), best[1] / len(paths)


def steps_of_one_image(tmp: Path, paths: list[Path], pre, stand_in: torch.Tensor, s: int) -> dict:
    """Milliseconds per image of each step, on one thread as in a decode worker (the main process's steps run
    on the GPU where there is one: normalising; the cast and statistics are taken on the device)."""
    torch.set_num_threads(1)
    steps, n = {}, len(paths)
    features = stand_in[:n]
    for setting, (resize, compressor, precision, draft) in SETTINGS.items():
        draft_to = draft_side(pre, draft)
        if setting in ("defaults", "jpeg_draft 1x"):  # the decoder before, in the same process: the baseline
            steps[f"({setting}: PIL decode, the stage's decoder before 2026-11-28; not counted)"] = (
                decode_then_resize(paths, pre, resize, draft_to, load=pil_array)[0]
            )
        before = "before" in setting
        decode, resized = decode_then_resize(
            paths, pre, resize, draft_to, load=pil_array if before else load_rgb_array
        )
        steps[f"{setting}: decode JPEG ({'PIL' if before else 'simplejpeg'}, draft to {draft} the side)"] = (
            decode
        )
        steps[f"{setting}: resize + crop ({resize})"] = resized
        decoded = [load_rgb_array(p, min_side=16, max_pixels=10**9, draft_to=draft_to) for p in paths]
        pixels = [pre.to_pixels(img, resize) for img in decoded]
        batch = torch.from_numpy(np.stack(pixels))
        buffer = shard_buffer(layout_for(n, stand_in, s, compressor, precision), 0, n)
        steps[f"{setting}: main process: normalise (GPU where there is one)"] = per_image(
            lambda batch=batch: pre.normalize(batch), n
        )
        steps[f"{setting}: main process: quantise + shard statistics"] = per_image(
            lambda buffer=buffer: add_batch(buffer, np.arange(n), features), n
        )
        if "before" in setting or "first" in setting:
            # stores before then quantised in NumPy on the writer thread
            steps[f"{setting}: main process: quantise + shard statistics"] = per_image(
                lambda precision=precision: (
                    value_stats(features.numpy()),
                    quantize(features.numpy(), precision),
                ),
                n,
            )
        codecs = resolve_codecs(precision, compressor, None)
        feature_codec = numcodecs_codec(
            compressors(codecs["compressor"], codecs["compression_level"], codecs["compression_blocksize"])[0]
        )
        pixel_codec = numcodecs_codec(
            compressors(codecs["pixel_compressor"], codecs["pixel_compression_level"])[0]
        )
        f16, _ = quantize(features.numpy(), precision)  # what the writer gets
        steps[f"{setting}: compress features + pixels"] = per_image(
            lambda fc=feature_codec, pc=pixel_codec, f16=f16, pixels=pixels: [
                (fc.encode(f), pc.encode(p)) for f, p in zip(f16, pixels, strict=True)
            ], n
        )  # fmt: skip
        target = create(
            tmp / f"write-test-{setting}.zarr", layout_for(n, stand_in, s, compressor, precision), {}
        )
        write = per_image(
            lambda target=target, f16=f16, pixels=pixels: target.write_shard(
                0, f16, np.stack(pixels), np.arange(n), np.ones(n, bool), {"n_encoded": n, "failures": [], "stats": {}},
                quantized=True
            ), n
        )  # fmt: skip
        steps[f"{setting}: write shard files (+ SHA-256, ids, record)"] = (
            write - steps[f"{setting}: compress features + pixels"]
        )
    torch.set_num_threads(2)
    return steps


def draft_fidelity(paths: list[Path], pre) -> str:
    """How far jpeg_draft 1x moves the encoder's pixels from the default's (a full decode of these photos)."""
    full, drafted = (
        np.stack([decode_for_encoder(p, pre, TransformSpec(), 16, 10**9, "torch", d)[0] for p in paths]).astype(float)
        for d in ("2x", "1x")
    )  # fmt: skip
    diff = np.abs(full - drafted)
    mse = np.mean(diff**2)
    psnr = 10 * np.log10(255**2 / mse) if mse else float("inf")
    return (f"jpeg_draft 1x vs the default's pixels: PSNR {psnr:.1f} dB, mean |diff| {diff.mean():.2f} levels, "
            f"99th percentile {np.percentile(diff, 99):.0f}, max {diff.max():.0f}")  # fmt: skip


def layout_for(n: int, stand_in: torch.Tensor, s: int, compressor: str, precision: str) -> StoreLayout:
    _, grid, _, width = stand_in.shape
    return StoreLayout(n_images=n, grid_hw=(grid, grid), hidden_dim=width, pixel_size=s, shard_images=n,
                       precision=precision, store_pixels=True, **resolve_codecs(precision, compressor, None))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--resolution", type=int, default=224)
    args = parser.parse_args()
    s, grid, width = args.resolution, args.resolution // 16, 768
    stand_in = torch.from_numpy(np.random.default_rng(0).standard_normal((64, grid, grid, width), np.float32))
    encoders.Encoder.encode_layers = lambda self, x, layers: [
        stand_in[: len(x)] for _ in layers
    ]  # costs nothing
    spec = EncoderSpec(name="stand-in", backend="timm", model_id="vit_base_patch16_224", resolution=s,
                       patch_size=16, preprocessing_source="timm_pretrained_cfg", weights="random")  # fmt: skip
    built = encoders.load(spec, device="cpu")
    encoders.load = lambda *a, **k: built  # the model is built once, outside the timed runs
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        coco_sized_jpegs(tmp / "images", args.images)
        dataset = DatasetSpec(
            name="jpegs", kind="folder", root=tmp, splits={"all": SplitSpec(images_dir=tmp / "images")}
        )
        rows, timings = {}, {}
        for rep in range(2):  # the first round warms the fork server and page cache; the second is reported
            for setting, threads in WRITER_THREADS.items():
                resize, compressor, precision, draft = SETTINGS[setting.split(",")[0]]
                for workers in (1, 2):
                    job = EncodeJob(tmp / f"stores-{rep}-{workers}-{setting}", dataset, "all", SubsetSpec(), spec,
                                    TransformSpec(), StoreOptions(compressor=compressor, precision=precision),
                                    EncodeOptions(batch_size=32, num_workers=workers, device="cpu", resize=resize,
                                                  writer_threads=threads, jpeg_draft=draft))  # fmt: skip
                    start = time.perf_counter()
                    result = encode.run(job, progress=False)
                    rows[setting, workers] = args.images / (time.perf_counter() - start)
                    timings[setting, workers] = result.timing()
        paths = sorted((tmp / "images").glob("*.jpg"))[:64]
        steps = steps_of_one_image(tmp, paths, built.preprocessing, stand_in, s)
        fidelity = draft_fidelity(paths, built.preprocessing)
    print(f"# encode stage ceiling: stand-in encoder, {args.images} JPEGs 640x480 -> {s} px, ViT-B-shaped "
          f"features ({grid}x{grid}x{width}; float16 unless the setting names bf16_bitround), CPU (2 cores)\n")  # fmt: skip
    print("| setting | 1 decode worker, images/s | 2 decode workers, images/s |\n|---|---|---|")
    for setting in WRITER_THREADS:
        print(f"| {setting} | {rows[setting, 1]:.0f} | {rows[setting, 2]:.0f} |")
    print("\nthe stage's own account of the reported round (its `time` line), defaults:")
    for workers in (1, 2):
        print(f"- {workers} decode worker{'s' * (workers > 1)}: {timings['defaults', workers]}")
    print("\n| step (one image, one thread) | ms |\n|---|---|")
    for name, t in steps.items():
        print(f"| {name} | {1e3 * t:.2f} |")
    for setting in SETTINGS:
        mine = {k: v for k, v in steps.items() if k.startswith(f"{setting}: ")}  # the baseline row is not
        cpu = sum(v for k, v in mine.items() if "normalise" not in k)
        print(f"\n{setting}: CPU time per image without the GPU's share {1e3 * cpu:.2f} ms = "
              f"{1 / cpu:.0f} images/s per core; shares: "
              + ", ".join(f"{k.split(': ')[-1]} {100 * v / cpu:.0f} %" for k, v in mine.items() if "normalise" not in k))  # fmt: skip

    print(f"\n{fidelity}")


if __name__ == "__main__":
    main()
