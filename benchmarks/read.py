"""Reading features back: zarr-python against reconlab's direct shard reader (storage/shard_reader.py) and the
paper's one `.pt` file per image, on ViT-B/16 @ 224-shaped float16 features (256 images, shards of 64, blosc zstd
shuffle level 3, random values: compressed size and speed are upper bounds for real features, which compress a
little). Prints ms per random image and MB/s for a sequential read of everything.
    .venv/bin/python benchmarks/read.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from storage.precision import compressors
from storage.shard_reader import ShardReader


def per_call(fn, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    n, h, w, d, k = 256, 14, 14, 768, 64
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((n, h, w, d)) * 2).astype(np.float16)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        group = zarr.open_group(tmp / "s.zarr", mode="w")
        group.create_array("features", shape=data.shape, dtype="float16", chunks=(1, h, w, d), shards=(k, h, w, d),
                           compressors=compressors("blosc_zstd_shuffle", 3))[:] = data  # fmt: skip
        (tmp / "pt").mkdir()
        for i in range(n):
            torch.save(torch.from_numpy(data[i]), tmp / "pt" / f"{i}.pt")
        array = zarr.open_array(tmp / "s.zarr" / "features", mode="r")
        reader = ShardReader.of(array, tmp / "s.zarr" / "features")
        assert np.array_equal(reader.read(np.arange(n)), data)
        picks = rng.integers(0, n, 200)
        random_ms = {
            "zarr-python `array[i]`": lambda: [array[int(i)] for i in picks],
            "reconlab direct shard reader": lambda: [reader.read(np.array([i])) for i in picks],
            "one .pt file per image (torch.load)": lambda: [
                torch.load(tmp / "pt" / f"{int(i)}.pt") for i in picks
            ],
        }
        sequential = {
            "zarr-python `array[:]`": lambda: array[:],
            "reconlab direct shard reader (shards on threads)": lambda: reader.read(np.arange(n)),
            "one .pt file per image (torch.load)": lambda: [
                torch.load(tmp / "pt" / f"{i}.pt") for i in range(n)
            ],
        }
        print(f"# reads, {n} images of {h}x{w}x{d} float16 ({data.nbytes / 1e6:.0f} MB), CPU, "
              f"{torch.get_num_threads()} threads\n")  # fmt: skip
        print("| read | one image at random, ms | sequential, all images, MB/s |\n|---|---|---|")
        for (name, rnd), seq in zip(random_ms.items(), sequential.values(), strict=True):
            print(
                f"| {name} | {1e3 * per_call(rnd) / len(picks):.2f} | {data.nbytes / 1e6 / per_call(seq):.0f} |"
            )


if __name__ == "__main__":
    main()
