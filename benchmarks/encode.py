"""Encode-stage benchmark: model-only forward vs reconlab's encode stage vs the paper code's pattern.

Prints tables (throughput, ratios, bytes per image, read latency, codec and chunking comparisons); the figures
go to docs/benchmarks.md. Run:  .venv/bin/python benchmarks/encode.py [--model vit_tiny_patch16_224 --resolution 112]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from pipeline.config import DatasetSpec, EncodeOptions, EncoderSpec, StoreOptions, SubsetSpec, TransformSpec
from pipeline.data import decode_workers, demo
from pipeline.data.datasets import list_images
from pipeline.models import encoders
from pipeline.stages import encode
from storage import StoreLayout, create, open_store
from storage.inspect import disk_bytes


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="vit_tiny_patch16_224", help="timm model (random init)")
    p.add_argument("--resolution", type=int, default=112)
    p.add_argument("--n-images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3, help="best-of-N for paths (a), (b, float16) and (c)")
    p.add_argument("--work-dir", default=None, help="scratch folder (default: a temp dir, removed after)")
    return p.parse_args()


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    args = parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="reconlab-bench-"))
    data_root = demo.build(work / "demo", n_train=args.n_images, n_val=8)
    dataset = DatasetSpec(name="demo", kind="demo", root=data_root)
    spec = EncoderSpec(
        name="bench", backend="timm", model_id=args.model, resolution=args.resolution, patch_size=16,
        preprocessing_source="timm_pretrained_cfg", weights="random",
    )  # fmt: skip
    enc = encoders.load(spec, device=args.device)
    # What each encode run pays to build the model (imports are warm by then): measured on a second build.
    t_load, _ = timed(lambda: encoders.load(spec, device=args.device))
    records = list_images(dataset, "train", SubsetSpec())
    n = len(records)
    print(
        f"# encoder {args.model} @ {args.resolution}px (random init), {n} images, batch {args.batch_size}, "
        f"device {enc.device}, compute {enc.compute_dtype}, torch threads {torch.get_num_threads()}, "
        f"workers {args.num_workers}"
    )

    # (a) compute limit: forward on pre-decoded pixels already in memory.
    ds = decode_workers.DecodeDataset(records, enc.preprocessing, TransformSpec(), EncodeOptions())
    pixels = torch.from_numpy(np.stack([ds[i][1] for i in range(n)]))
    if enc.device.type == "cuda":
        pixels = pixels.pin_memory()
    enc.encode(enc.normalize(pixels[: args.batch_size]))  # warm-up

    def forward_only():
        for i in range(0, n, args.batch_size):
            enc.encode(enc.normalize(pixels[i : i + args.batch_size])).cpu()

    # Best of --repeats for (a), (b, float16) and (c): short runs on a shared machine are noisy, and the fastest
    # run is the best estimate of each path's ceiling.
    t_a = min(timed(forward_only)[0] for _ in range(args.repeats))

    # (b) reconlab encode stage, JPEG files -> finished store, per precision.
    rows_b = {}
    # Warm-up run (first DataLoader worker start, first zarr writes) on a few images, not measured.
    warm = encode.EncodeJob(work / "stores-warmup", dataset, "val", SubsetSpec(), spec, TransformSpec(),
                            StoreOptions(), EncodeOptions(batch_size=args.batch_size, num_workers=args.num_workers))  # fmt: skip
    encode.run(warm, progress=False)
    for precision in ("float16", "bf16_bitround", "int8_per_token"):
        runs = []
        for repeat in range(args.repeats if precision == "float16" else 1):
            job = encode.EncodeJob(
                store_root=work / f"stores-{precision}-{repeat}", dataset=dataset, split="train",
                subset=SubsetSpec(), encoder=spec, transform=TransformSpec(), store=StoreOptions(precision=precision),
                options=EncodeOptions(batch_size=args.batch_size, num_workers=args.num_workers, device=args.device),
            )  # fmt: skip
            runs.append(timed(lambda job=job: encode.run(job, progress=False)))
        t_b, result = min(runs, key=lambda r: r[0])
        rows_b[precision] = (t_b, result.store_path)
    t_b, store_path = rows_b["float16"]

    # (c) the released paper code's pattern: batch 2, one torch.save of a bf16 tensor per image.
    pt_dir = work / "pt"
    pt_dir.mkdir()
    loader = torch.utils.data.DataLoader(
        ds, batch_size=2, num_workers=args.num_workers, collate_fn=decode_workers.collate
    )

    def paper_pattern():
        for positions, batch, _ in loader:
            feats = enc.encode(enc.normalize(batch)).to(torch.bfloat16).cpu()
            for pos, f in zip(positions.tolist(), feats, strict=True):
                torch.save(f.clone(), pt_dir / f"{records[pos].image_id}.pt")

    t_c = min(timed(paper_pattern)[0] for _ in range(args.repeats))
    pt_bytes = disk_bytes(pt_dir) / n

    print("\n## Throughput")
    print("| path | images/s | ratio |")
    print("|---|---|---|")
    print(f"| (a) model forward, pixels in memory | {n / t_a:.1f} | 1.00 |")
    print(f"| (b) reconlab encode stage, JPEG -> store (float16) | {n / t_b:.1f} | b/a = {t_a / t_b:.2f} |")
    print(
        f"| (b) same, excluding the one-time model load ({t_load:.1f} s) | {n / (t_b - t_load):.1f} | "
        f"b/a = {t_a / (t_b - t_load):.2f} |"
    )
    print(
        f"| (c) paper pattern: batch 2, torch.save bf16 per image | {n / t_c:.1f} | b/c = {t_c / t_b:.2f} |"
    )
    for precision in ("bf16_bitround", "int8_per_token"):
        t, _ = rows_b[precision]
        print(f"| (b) encode stage, precision {precision} | {n / t:.1f} | b/a = {t_a / t:.2f} |")

    # Size and error per precision, against the float32 values re-computed from the stored pixels.
    exact = np.concatenate([
        enc.encode(enc.normalize(pixels[i : i + args.batch_size])).numpy() for i in range(0, n, args.batch_size)
    ])  # fmt: skip
    print("\n## Bytes per image and error (features only)")
    print("| storage | bytes/image | vs (c) | max rel. error (|x|>1e-3) | max error / token max-abs |")
    print("|---|---|---|---|---|")
    normal = np.abs(exact) > 1e-3
    token_max = np.abs(exact).max(axis=-1, keepdims=True)
    bf16 = torch.from_numpy(exact).to(torch.bfloat16).float().numpy()
    print(
        f"| (c) torch.save bf16 .pt | {pt_bytes:,.0f} | 1.00 | {np.max(np.abs(bf16 - exact)[normal] / np.abs(exact)[normal]):.2e} | "
        f"{np.max(np.abs(bf16 - exact) / token_max):.2e} |"
    )
    for precision, (_, path) in rows_b.items():
        store = open_store(path)
        per_image = disk_bytes(path / "features") / n
        if "features_scale" in store.group:
            per_image += disk_bytes(path / "features_scale") / n
        got = store.features()
        rel = np.max(np.abs(got - exact)[normal] / np.abs(exact)[normal])
        print(
            f"| reconlab {precision} | {per_image:,.0f} | {per_image / pt_bytes:.2f} | {rel:.2e} | "
            f"{np.max(np.abs(got - exact) / token_max):.2e} |"
        )

    # Reads: one image at random, and sequential.
    store = open_store(store_path)
    rng = np.random.default_rng(0)
    picks = rng.integers(0, n, 50)
    t_rand, _ = timed(lambda: [store.group["features"][int(i)] for i in picks])
    files = sorted(pt_dir.glob("*.pt"))
    t_rand_pt, _ = timed(lambda: [torch.load(files[int(i)], weights_only=True) for i in picks])
    feat_bytes = exact.astype(np.float16).nbytes
    t_seq, _ = timed(lambda: store.features())
    t_seq_pt, _ = timed(lambda: [torch.load(f, weights_only=True) for f in files])
    print("\n## Reads (float16 store vs .pt files)")
    print("| read | reconlab store | paper .pt files |")
    print("|---|---|---|")
    print(
        f"| one image at random (ms) | {1e3 * t_rand / len(picks):.2f} | {1e3 * t_rand_pt / len(picks):.2f} |"
    )
    print(
        f"| sequential, all images (MB/s of fp16 features) | {feat_bytes / t_seq / 1e6:.0f} | "
        f"{feat_bytes / t_seq_pt / 1e6:.0f} |"
    )

    codec_table(exact, work, n)
    chunking_table(exact, work)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


def codec_table(exact: np.ndarray, work: Path, n: int) -> None:
    n_img, h, w, d = exact.shape
    print("\n## Compressors x precision (features, shards of 64, one image per inner chunk)")
    print("| precision | compressor | level | bytes/image | ratio vs raw fp16 | write MB/s |")
    print("|---|---|---|---|---|---|")
    combos = [(c, 3) for c in ("blosc_zstd_bitshuffle", "blosc_zstd_shuffle", "zstd", "blosc_lz4", "none")]
    combos += [("blosc_zstd_shuffle", 7), ("blosc_zstd_bitshuffle", 7)]
    for precision in ("float16", "bf16_bitround", "int8_per_token"):
        for compressor, level in combos:
            layout = StoreLayout(n_img, (h, w), d, 16, 64, precision, compressor, False, level)
            path = work / f"codec-{precision}-{compressor}-{level}.zarr"
            store = create(path, layout, {"config_hash": "bench"})
            start = time.perf_counter()
            for shard in range(layout.n_shards):
                rows = layout.shard_slice(shard)
                m = rows.stop - rows.start
                store.write_shard(shard, exact[rows], None, np.arange(m), np.ones(m, bool),
                                  {"n_encoded": m, "failures": [], "stats": {}})  # fmt: skip
            elapsed = time.perf_counter() - start
            size = disk_bytes(path / "features") + (
                disk_bytes(path / "features_scale") if (path / "features_scale").exists() else 0
            )
            raw16 = exact.size * 2
            print(
                f"| {precision} | {compressor} | {level} | {size / n:,.0f} | {raw16 / size:.2f} | {raw16 / elapsed / 1e6:.0f} |"
            )


def chunking_table(exact: np.ndarray, work: Path) -> None:
    n, h, w, d = exact.shape
    data = exact.astype(np.float16)
    print("\n## Chunking (float16, blosc zstd shuffle level 3)")
    print("| layout | files | random read of one image (ms) | sequential read (MB/s) |")
    print("|---|---|---|---|")
    from storage.precision import compressors

    layouts = {
        "chunk 1 image, shards of 64": dict(chunks=(1, h, w, d), shards=(64, h, w, d)),
        "chunk 64 images, no shards": dict(chunks=(64, h, w, d)),
        "chunk 1 image, no shards": dict(chunks=(1, h, w, d)),
    }
    rng = np.random.default_rng(1)
    for name, kw in layouts.items():
        path = work / f"chunk-{len(os.listdir(work))}.zarr"
        arr = zarr.create_array(str(path), shape=data.shape, dtype="float16",
                                compressors=compressors("blosc_zstd_shuffle"), **kw)  # fmt: skip
        step = 64
        for i in range(0, n, step):
            arr[i : i + step] = data[i : i + step]
        arr = zarr.open_array(str(path), mode="r")
        picks = rng.integers(0, n, 50)
        t_rand, _ = timed(lambda arr=arr, picks=picks: [arr[int(i)] for i in picks])
        t_seq, _ = timed(lambda arr=arr: arr[:])
        n_files = sum(1 for p in path.rglob("*") if p.is_file())
        print(f"| {name} | {n_files} | {1e3 * t_rand / 50:.2f} | {data.nbytes / t_seq / 1e6:.0f} |")


if __name__ == "__main__":
    main()
