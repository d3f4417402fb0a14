"""Reading features back from a reconlab store (`FeatureStore.features`, through storage/shard_reader.py) against
zarr-python on the same arrays, the paper's one `.pt` file per image, a raw uncompressed NumPy memmap (the disk's
practical limit here) and the train stage's loader (`batch_stream`: whole shards through a shuffle buffer; images/s
of features alone and of features + pixels, the stores holding photos at the encoder's size).
ViT-B/16 features at 224 px (14x14x768) and 512 px (32x32x768), at float16, bf16_bitround and int8_per_token;
random values (a bound: real features compress a little); shards of 64, the `auto` codec per precision and
blosc zstd in blosc's own blocks (level 3, 7 for bf16_bitround: the codecs before); best of 3, warm page cache.
Prints ms per random image and MB/s (of float16-sized features) and images/s for a sequential read of everything.
    .venv/bin/python benchmarks/read.py [--loader-only]   (taskset -c 0 in front: the same on one core)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from pipeline.data.feature_loader import batch_stream
from storage import StoreLayout, create, open_store
from storage.precision import quantize, resolve_codecs


def best(fn, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def photos(size: int, n: int) -> np.ndarray:
    """n images of size x size cycling through scikit-image's photos (pixels compress like real ones)."""
    from PIL import Image
    from skimage import data

    base = [np.asarray(Image.fromarray(getattr(data, name)()).convert("RGB").resize((size, size)))
            for name in ("astronaut", "coffee", "chelsea", "rocket")]  # fmt: skip
    return np.stack([base[i % len(base)] for i in range(n)])


def drop_each(read_one, picks) -> None:
    """Each result dropped as read, as a training step would: keeping 100 of them alive makes every read pay
    fresh page faults for its output (~0.4 ms at 512 px, for every reader alike)."""
    for i in picks:
        read_one(i)


def one_case(
    tmp: Path, n: int, grid: int, precision: str, compressor: str, rng, loader_only: bool
) -> list[str]:
    d, k = 768, 64
    features = (rng.standard_normal((n, grid, grid, d)) * 2).astype(np.float32)
    size = grid * 16
    layout = StoreLayout(n_images=n, grid_hw=(grid, grid), hidden_dim=d, pixel_size=size, shard_images=k,
                         precision=precision, **resolve_codecs(precision, compressor, None))  # fmt: skip
    store = create(tmp / f"{precision}-{compressor}-{grid}.zarr", layout, {})
    pixels = photos(size, n)
    for shard in range(layout.n_shards):
        rows = layout.shard_slice(shard)
        store.write_shard(shard, features[rows], pixels[rows], np.arange(rows.start, rows.stop),
                          np.ones(rows.stop - rows.start, bool), {"n_encoded": 0, "failures": [], "stats": {}})  # fmt: skip
    store = open_store(store.path, require_complete=False)
    stored, scale = quantize(features, precision)
    pt = tmp / f"pt-{precision}-{compressor}-{grid}"
    pt.mkdir()
    for i in range(n):  # the paper's layout: a tensor file per image (bf16 as torch.bfloat16)
        tensor = (
            torch.from_numpy(features[i]).bfloat16()
            if precision == "bf16_bitround"
            else torch.from_numpy(stored[i])
        )
        torch.save(
            {"f": tensor, "scale": None if scale is None else torch.from_numpy(scale[i])}, pt / f"{i}.pt"
        )
    raw_path = tmp / f"raw-{precision}-{compressor}-{grid}.npy"
    raw = np.lib.format.open_memmap(raw_path, "w+", stored.dtype, stored.shape)
    raw[:] = stored
    raw.flush()
    raw = np.load(raw_path, mmap_mode="r")
    array = zarr.open_array(store.path / "features", mode="r")
    store.features(slice(None))  # the first read of each shard checks its SHA-256: once per process
    picks = rng.integers(0, n, 100)
    readers = {
        "reconlab store": (lambda i: store.features(int(i)), lambda: store.features(slice(None))),
        "reconlab store, as stored": (lambda i: store.features(int(i), as_stored=True),
                                      lambda: store.features(slice(None), as_stored=True)),
        "zarr-python": (lambda i: array[int(i)], lambda: array[:]),
        ".pt per image": (lambda i: torch.load(pt / f"{int(i)}.pt"), lambda: [torch.load(pt / f"{i}.pt") for i in range(n)]),
        "raw memmap": (lambda i: np.array(raw[int(i)]), lambda: np.array(raw)),
        "train loader, features (shuffle buffer 64, batch 32)": (None, lambda: list(batch_stream(store, 32, 0, 0, 64, pixels=False))),
        "train loader, features + pixels": (None, lambda: list(batch_stream(store, 32, 0, 0, 64))),
    }  # fmt: skip
    if loader_only:
        readers = {name: reader for name, reader in readers.items() if name.startswith("train loader")}
    mb = n * grid * grid * d * 2 / 1e6
    out = []
    codec = f"{layout.compressor} {layout.compression_level}"
    for name, (one, everything) in readers.items():
        random_ms = f"{1e3 * best(lambda one=one: drop_each(one, picks)) / len(picks):.2f}" if one else "—"
        sequential_s = best(everything)
        out.append(f"| {grid * 16} px | {precision} | {codec} | {name} | {random_ms} | {mb / sequential_s:.0f} | "
                   f"{n / sequential_s:.0f} |")  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--loader-only", action="store_true", help="only the train loader rows, auto codecs")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("| input | precision | codec | read | one image at random, ms | sequential, MB/s (float16-sized) | "
          "sequential, images/s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for grid, n in ((14, 256), (32, 128)):
            precisions = ("float16", "bf16_bitround", "int8_per_token")
            # blosc_zstd_shuffle: the default before `auto` (float16), and auto's first codecs (zstd 7
            # and 3 in blosc's own blocks) for the others
            for compressor in ("auto",) if args.loader_only else ("auto", "blosc_zstd_shuffle"):
                for precision in precisions:
                    for line in one_case(Path(tmp), n, grid, precision, compressor, rng, args.loader_only):
                        print(line, flush=True)


if __name__ == "__main__":
    main()
