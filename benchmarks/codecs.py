"""Codecs per array (`store.compressor: auto`): size ratio and one-thread encode / decode time of one image's
chunk, for float16 ViT-B features (heavy-tailed random values with per-channel scales, as activations have) and
for photos (scikit-image's), at 224 and 512 px. Best of 20.
    .venv/bin/python benchmarks/codecs.py
"""

from __future__ import annotations

import time

import numcodecs
import numpy as np
from PIL import Image
from skimage import data

CODECS = {
    "blosc zstd shuffle 3": numcodecs.Blosc("zstd", 3, numcodecs.Blosc.SHUFFLE),
    "blosc zstd shuffle 1": numcodecs.Blosc("zstd", 1, numcodecs.Blosc.SHUFFLE),
    "blosc lz4 shuffle 5": numcodecs.Blosc("lz4", 5, numcodecs.Blosc.SHUFFLE),
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
    print("| array | px | codec | ratio | encode ms | decode ms |\n|---|---|---|---|---|---|")
    for size in (224, 512):
        grid = size // 16
        features = (rng.standard_t(4, (grid, grid, 768)) * np.exp(rng.standard_normal(768))).astype(
            np.float16
        )
        pixels = [np.asarray(Image.fromarray(p).convert("RGB").resize((size, size))) for p in photos]
        for array, chunks in (("features float16", [features]), ("pixels", pixels)):
            for name, codec in CODECS.items():
                encoded = [codec.encode(c) for c in chunks]
                ratio = sum(c.nbytes for c in chunks) / sum(len(e) for e in encoded)
                encode = np.mean([best_ms(lambda c=c, codec=codec: codec.encode(c)) for c in chunks])
                decode = np.mean([best_ms(lambda e=e, codec=codec: codec.decode(e)) for e in encoded])
                print(f"| {array} | {size} | {name} | {ratio:.3f} | {encode:.2f} | {decode:.2f} |")


if __name__ == "__main__":
    main()
