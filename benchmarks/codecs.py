"""Codecs per array (`store.compressor: auto`): size ratio and one-thread encode / decode time of one image's
chunk, for ViT-B features (heavy-tailed random values with per-channel scales, as activations have) stored as
float16, bf16-rounded float32 and int8 codes, and for photos (scikit-image's), at 224 and 512 px. Best of 20
(encode: best of 5). "1 MiB blocks" sets blosc's block size; otherwise blosc chooses (32-256 KiB).
    .venv/bin/python benchmarks/codecs.py
"""

from __future__ import annotations

import argparse
import time

import numcodecs
import numpy as np
from PIL import Image
from skimage import data

from storage.precision import ZSTD_BLOCK_BYTES, quantize

SHUFFLE = numcodecs.Blosc.SHUFFLE
CODECS = {
    "blosc zstd shuffle 3": numcodecs.Blosc("zstd", 3, SHUFFLE),
    "blosc zstd shuffle 1": numcodecs.Blosc("zstd", 1, SHUFFLE),
    "blosc lz4 shuffle 5": numcodecs.Blosc("lz4", 5, SHUFFLE),
}
# bf16-rounded floats and int8 codes: the levels `auto` used first (7 and 3) against level 1 in
# bigger blocks (auto's now)
ZSTD_CODECS = {
    "blosc zstd shuffle 7": numcodecs.Blosc("zstd", 7, SHUFFLE),
    "blosc zstd shuffle 3": numcodecs.Blosc("zstd", 3, SHUFFLE),
    "blosc zstd shuffle 1": numcodecs.Blosc("zstd", 1, SHUFFLE),
    "blosc zstd shuffle 1, 1 MiB blocks": numcodecs.Blosc("zstd", 1, SHUFFLE, blocksize=ZSTD_BLOCK_BYTES),
    "blosc lz4 shuffle 5": numcodecs.Blosc("lz4", 5, SHUFFLE),
}


def best_ms(fn, reps: int = 20) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main() -> None:
    numcodecs.blosc.use_threads = False  # one thread, as each writer thread and reader task uses
    rng = np.random.default_rng(0)
    photos = [getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")]
    print(
        "| array | px | codec | ratio | bytes / float16 bytes | encode ms | decode ms |\n|---|---|---|---|---|---|---|"
    )
    for size in (224, 512):
        grid = size // 16
        features = (rng.standard_t(4, (grid, grid, 768)) * np.exp(rng.standard_normal(768))).astype(
            np.float32
        )
        pixels = [np.asarray(Image.fromarray(p).convert("RGB").resize((size, size))) for p in photos]
        arrays = {
            "features float16": ([features.astype(np.float16)], CODECS),
            "features bf16_bitround": ([quantize(features, "bf16_bitround")[0]], ZSTD_CODECS),
            "features int8_per_token (codes)": ([quantize(features, "int8_per_token")[0]], ZSTD_CODECS),
            "pixels": (pixels, CODECS),
        }
        float16_bytes = features.size * 2
        for array, (chunks, codecs) in arrays.items():
            for name, codec in codecs.items():
                encoded = [codec.encode(c) for c in chunks]
                ratio = sum(c.nbytes for c in chunks) / sum(len(e) for e in encoded)
                vs_float16 = np.mean([len(e) for e in encoded]) / float16_bytes
                encode = np.mean([best_ms(lambda c=c, codec=codec: codec.encode(c), 5) for c in chunks])
                decode = np.mean([best_ms(lambda e=e, codec=codec: codec.decode(e)) for e in encoded])
                print(
                    f"| {array} | {size} | {name} | {ratio:.3f} | {vs_float16:.3f} | {encode:.2f} | {decode:.2f} |"
                )
    print("\n" + activation_sizes(photos))


def activation_sizes(photos: list[np.ndarray]) -> str:
    """Stored bytes of real activations: a random-init ViT-B/16's last block on the photos (random values above
    are a bound; activations have structure a codec finds). Bytes per image relative to its float16 features."""
    from pipeline.models import _torchvision_shim

    _torchvision_shim.install()
    import timm
    import torch

    torch.manual_seed(0)
    lines = ["| precision | px | " + " | ".join(ZSTD_CODECS) + " |", "|---|---|" + "---|" * len(ZSTD_CODECS)]
    for size in (224, 512):
        model = timm.create_model(
            "vit_base_patch16_224", pretrained=False, img_size=size, num_classes=0
        ).eval()
        resized = [np.asarray(Image.fromarray(p).convert("RGB").resize((size, size))) for p in photos]
        x = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        with torch.inference_mode():
            tokens = model.forward_features(x)[:, model.num_prefix_tokens :].numpy()
        features = tokens.reshape(len(photos), size // 16, size // 16, -1)
        for precision in ("float16", "bf16_bitround", "int8_per_token"):
            stored, _ = quantize(features, precision)
            sizes = [
                np.mean([len(c.encode(f)) for f in stored]) / (features[0].size * 2)
                for c in ZSTD_CODECS.values()
            ]
            lines.append(f"| {precision} | {size} | " + " | ".join(f"{v:.3f}" for v in sizes) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__).parse_args()  # no options: --help says what it measures
    main()
