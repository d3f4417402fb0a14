"""Several feature layers of one encoder: what one forward pass saves, and how to lay the layers out on disk.

1. The encode stage (decode workers, forward, compression, writes), random-weight ViT on the demo photos:
   one layer; six layers from one pass (`encode.run_layers`); six separate passes (`encode.run` per layer, each
   stopping after its block, as reconlab does); bytes per image per layer.
2. The forward alone on decoded batches: one layer, six layers in one pass, six passes that stop early, and six
   full passes (the model run to its end for each layer, as code that reads `output_hidden_states` does).
3. The layout: one store per layer (reconlab) against one array with a layer dimension (chunk = one image at one
   layer), written with the same codec by plain zarr: write MB/s, bytes, and the time to read one layer.

    .venv/bin/python benchmarks/layers.py [--model vit_small_patch16_224] [--resolution 224] [--images 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipeline.config import DatasetSpec, EncodeOptions, EncoderSpec, StoreOptions, SubsetSpec, TransformSpec
from pipeline.data import demo
from pipeline.jobs import EncodeJob
from pipeline.models import encoders
from pipeline.stages import encode
from storage import open_store

LAYERS = [-1, -2, -4, -6, -8, -12]


def _bytes(path: Path, prefix: str = "") -> int:
    return sum(
        f.stat().st_size
        for f in path.rglob("*")
        if f.is_file() and f.relative_to(path).parts[0].startswith(prefix)
    )


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = demo.build(tmp / "demo", n_train=args.images, n_val=4)
        base = EncoderSpec(name="bench", backend="timm", model_id=args.model, resolution=args.resolution,
                           patch_size=args.patch, preprocessing_source="timm_pretrained_cfg", weights="random")  # fmt: skip
        specs = [base.model_copy(update={"name": f"bench.L{k}", "feature_layer": k}) for k in LAYERS]
        job = EncodeJob(tmp / "stores", DatasetSpec(name="demo", kind="demo", root=root), "train",
                        SubsetSpec(max_images=args.images), base, TransformSpec(), StoreOptions(shard_images=32),
                        EncodeOptions(batch_size=16, num_workers=1, device="cpu"))  # fmt: skip

        def jobs(folder: str, which=specs):
            return [replace(job, store_root=tmp / folder, encoder=s) for s in which]

        encode.run_layers(jobs("warm", specs[:1]), progress=False)  # imports, fork server, caches
        n = args.images
        rows = {}
        rows["1 layer (-2)"], _ = timed(lambda: encode.run_layers(jobs("one", specs[1:2]), progress=False))
        rows["6 layers, one pass"], together = timed(lambda: encode.run_layers(jobs("six"), progress=False))
        rows["6 layers, 6 passes"], _ = timed(lambda: [encode.run(j, progress=False) for j in jobs("apart")])
        print(f"# encode stage, {args.model} @ {args.resolution} px, random weights, {n} demo images, CPU "
              f"({torch.get_num_threads()} threads), layers {LAYERS}\n")  # fmt: skip
        print("| encode stage | wall s | images/s | vs 6 passes |\n|---|---|---|---|")
        for name, s in rows.items():
            print(f"| {name} | {s:.1f} | {n / s:.1f} | {rows['6 layers, 6 passes'] / s:.2f}x |")
        store = open_store(together[0].store_path)
        feats = _bytes(store.path, "features") / n
        pixels = _bytes(store.path, "pixels") / n
        print(f"\nbytes per image per layer: features {feats / 1e3:.1f} kB ({store.layout.precision}, {store.layout.compressor}), pixels "
              f"{pixels / 1e3:.1f} kB (one file per shard, hard-linked into every layer's store), whole store {_bytes(store.path) / n / 1e3:.1f} kB")  # fmt: skip

        # 2. The forward alone.
        enc = encoders.load(base, device="cpu")
        x = enc.normalize(torch.from_numpy(store.pixels(slice(0, 16))))
        forward = {
            "1 layer (-2)": lambda: enc.encode_layers(x, [-2]),
            "6 layers, one pass": lambda: enc.encode_layers(x, LAYERS),
            "6 passes, each stopping at its layer": lambda: [enc.encode_layers(x, [k]) for k in LAYERS],
            "6 full passes (model run to its end)": lambda: [
                enc.encode_layers(x, [k, "last"]) for k in LAYERS
            ],
        }
        enc.encode_layers(x, [-2])
        times = {name: min(timed(fn)[0] for _ in range(2)) for name, fn in forward.items()}
        print("\n| forward only (16 images) | s | vs one pass |\n|---|---|---|")
        for name, s in times.items():
            print(f"| {name} | {s:.2f} | {s / times['6 layers, one pass']:.2f}x |")

        # 3. Layouts, plain zarr, same codec.
        import zarr

        from storage.precision import compressors

        per_layer = np.stack(
            [open_store(r.store_path).features().astype(np.float16) for r in together], axis=1
        )
        _, n_layers, h, w, d = per_layer.shape
        codec = compressors("blosc_zstd_shuffle", 3)
        out = {}
        start = time.perf_counter()
        for k in range(n_layers):
            g = zarr.open_group(tmp / f"per-layer-{k}.zarr", mode="w")
            a = g.create_array("features", shape=(n, h, w, d), dtype="float16", chunks=(1, h, w, d),
                               shards=(32, h, w, d), compressors=codec)  # fmt: skip
            a[:] = per_layer[:, k]
        out["one store per layer"] = [time.perf_counter() - start]
        start = time.perf_counter()
        g = zarr.open_group(tmp / "layer-dim.zarr", mode="w")
        a = g.create_array("features", shape=(n, n_layers, h, w, d), dtype="float16", chunks=(1, 1, h, w, d),
                           shards=(32, n_layers, h, w, d), compressors=codec)  # fmt: skip
        a[:] = per_layer
        out["one array [N, L, H, W, D]"] = [time.perf_counter() - start]
        reads = {
            "one store per layer": lambda: zarr.open_array(tmp / "per-layer-1.zarr" / "features")[:],
            "one array [N, L, H, W, D]": lambda: zarr.open_array(tmp / "layer-dim.zarr" / "features")[:, 1],
        }
        sizes = {"one store per layer": sum(_bytes(tmp / f"per-layer-{k}.zarr") for k in range(n_layers)),
                 "one array [N, L, H, W, D]": _bytes(tmp / "layer-dim.zarr")}  # fmt: skip
        print(
            "\n| layout (6 layers) | write MB/s | bytes/image/layer | read one layer, s | read one image at one layer, ms |"
        )
        print("|---|---|---|---|---|")
        for name in out:
            read_s = min(timed(reads[name])[0] for _ in range(3))
            arr = zarr.open_array(
                tmp / ("per-layer-1.zarr" if "per" in name else "layer-dim.zarr") / "features"
            )
            one = (lambda a=arr: a[7]) if "per" in name else (lambda a=arr: a[7, 1])
            one_ms = 1e3 * min(timed(one)[0] for _ in range(5))
            print(f"| {name} | {per_layer.nbytes / out[name][0] / 1e6:.0f} | {sizes[name] / n / n_layers / 1e3:.1f} kB | "
                  f"{read_s:.3f} | {one_ms:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
