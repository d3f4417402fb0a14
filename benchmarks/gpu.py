"""Issue 13's GPU figures in one run, for the few sessions that are lent a GPU (15 minutes of device time,
machine start included). Every table is headed by the device's name and printed as it is measured. Run 1 on an
H200 took 212 s at 224 px and 317 s at 512 px (docs/benchmarks.md, "GPU figures"); `--encode-only` leaves out
training.

encode, a ViT-B/16 (random weights: throughput does not depend on them) at each resolution, on COCO-sized JPEGs:
  (a) the model alone: pre-decoded pixels in pinned memory -> GPU -> features back on the host;
  (b) reconlab's encode stage, JPEG files -> finished store (decode workers, writer threads), each row with the
      stage's own account of its time; other precisions, jpeg_draft 1x, fewer workers, one torch thread,
      the store in /dev/shm (memory: the file system's share);
  (c) the paper's pattern: batch 2, one `torch.save` of bf16 features per image.
train, the default reconstructor on the store (b) wrote: steps/s with batches streamed from the store through
  the train loader vs the same batches already on the GPU, bf16 autocast with torch.compile off, on and in its
  "reduce-overhead" mode (CUDA graphs; not in the train stage until measured), and float32;
  peak GPU memory of each; the largest batch that fits (doubling until out of memory).
host: the cost of touching fresh memory, device-to-host copies into pageable vs pinned memory, and writing a file
  in many write calls vs one (the shard writer's one call per image until 2026-11-27 vs one per file now).

    .venv/bin/python benchmarks/gpu.py                 # on the GPU machine
    .venv/bin/python benchmarks/gpu.py --smoke         # the same code on this CPU at toy sizes (tested)
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pipeline.config import (
    DatasetSpec,
    EncodeOptions,
    EncoderSpec,
    SplitSpec,
    StoreOptions,
    SubsetSpec,
    TrainConfig,
    TransformSpec,
)
from pipeline.data import decode_workers
from pipeline.data.datasets import list_images
from pipeline.data.feature_loader import EpochBatches, batch_stream
from pipeline.data.store_info import StoreInfo, open_encoded
from pipeline.jobs import EncodeJob
from pipeline.models import encoders
from pipeline.models.step_scalars import StepScalars
from pipeline.stages import encode, train
from storage.shard_writer import write_file

sys.path.insert(0, str(Path(__file__).parent))  # the sibling benchmark, also when imported by the test
from encode_ceiling import coco_sized_jpegs  # noqa: E402

SETTINGS = {  # the full run and the smoke test's toy sizes
    # train batches: the paper's per-device 10 (TrainConfig's default, configs/coco.yaml's) and 64
    "full": {"model": "vit_base_patch16_224", "resolutions": (224, 512), "images": 2048, "batch": 64,
             "train_batches": (10, 64), "train_steps": 60, "compile": (False, True, "reduce-overhead"),
             "max_batch": 8192},
    "smoke": {"model": "vit_tiny_patch16_224", "resolutions": (64,), "images": 24, "batch": 8,
              "train_batches": (8,), "train_steps": 3, "compile": (False,), "max_batch": 16},
}  # fmt: skip


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def _jpegs(work: Path, s: dict) -> DatasetSpec:
    folder = work / "jpegs"
    if not folder.is_dir():
        coco_sized_jpegs(folder, s["images"])
    return DatasetSpec(name="jpegs", kind="folder", root=work, splits={"all": SplitSpec(images_dir=folder)})


def _stage_job(folder: Path, dataset: DatasetSpec, spec: EncoderSpec, store: StoreOptions, s: dict,
               device: torch.device, **options) -> EncodeJob:  # fmt: skip
    return EncodeJob(folder, dataset, "all", SubsetSpec(), spec, TransformSpec(), store,
                     EncodeOptions(batch_size=s["batch"], device=str(device),
                                   writer_threads=min(4, options["num_workers"]), **options))  # fmt: skip


def train_store(work: Path, spec: EncoderSpec, s: dict, device: torch.device, workers: int) -> Path:
    """The float16 store the train rows read, made by the encode stage alone (--train-only)."""
    job = _stage_job(work / "float16", _jpegs(work, s), spec, StoreOptions(), s, device, num_workers=workers)
    return encode.run(job, progress=False).store_path


def encode_rows(
    work: Path, spec: EncoderSpec, s: dict, device: torch.device, workers: int
) -> tuple[list, Path]:
    """Images/s of (a), (b) and (c) for one resolution; the path of the store (b) wrote."""
    dataset = _jpegs(work, s)
    records = list_images(dataset, "all", SubsetSpec())
    n, batch = len(records), s["batch"]
    enc = encoders.load(spec, device=str(device))
    decoded = decode_workers.DecodeDataset(records, enc.preprocessing, TransformSpec(), EncodeOptions())
    pixels = torch.from_numpy(np.stack([decoded[i][1] for i in range(n)]))
    pixels = pixels.pin_memory() if device.type == "cuda" else pixels

    # the features come back into pinned memory, as the stage's do (a pageable copy can cost more than the model)
    grid = enc.encode(enc.normalize(pixels[:1].to(device))).shape[1:]
    features_back = torch.empty((batch, *grid), pin_memory=device.type == "cuda")

    def model_alone():
        for i in range(0, n, batch):
            x = pixels[i : i + batch].to(device, non_blocking=True)
            features = enc.encode(enc.normalize(x))
            features_back[: len(features)].copy_(features)

    model_alone()  # warm-up: cuDNN/cuBLAS choices, allocator
    a = min(timed(model_alone, device) for _ in range(2))

    def stage(
        folder: str, store: StoreOptions, torch_threads: int | None = None, root: Path = work, **options
    ):
        job = _stage_job(
            root / folder, dataset, spec, store, s, device, **{"num_workers": workers, **options}
        )
        threads = torch.get_num_threads()
        torch.set_num_threads(torch_threads or threads)
        start = time.perf_counter()
        result = encode.run(job, progress=False)
        seconds = time.perf_counter() - start
        torch.set_num_threads(threads)
        return seconds, result

    stage("warm-up", StoreOptions())  # worker start, page cache
    b, result = stage("float16", StoreOptions())
    load_s = result.seconds["model load"]
    per_image_steps = ("model", "to host", "into buffers", "device wait", "decode wait", "writer wait")
    per_image_s = sum(result.seconds[step] for step in per_image_steps)
    variants = [  # the COCO config's precision, the smallest one, and the cheaper JPEG decode
        (f"(b) {name}", *stage(name, StoreOptions(precision=name)))
        for name in ("bf16_bitround", "int8_per_token")
    ] + [
        ("(b) float16, jpeg_draft 1x", *stage("draft-1x", StoreOptions(), jpeg_draft="1x")),
        # where it saturates: fewer decode workers, and the main process's torch on one thread (its idle
        # intra-op threads spin on cores the decode workers need)
        (f"(b) float16, {max(1, workers // 3)} decode workers",
         *stage("fewer-workers", StoreOptions(), num_workers=max(1, workers // 3))),
        ("(b) float16, main process on 1 torch thread", *stage("one-thread", StoreOptions(), torch_threads=1)),
    ]  # fmt: skip
    # the same store in memory: how much of the stage's time is the file system's
    store_bytes = sum(f.stat().st_size for f in result.store_path.rglob("*") if f.is_file())
    if Path("/dev/shm").is_dir() and shutil.disk_usage("/dev/shm").free > 3 * store_bytes:
        with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
            variants.append(
                ("(b) float16, store in /dev/shm", *stage("in-memory", StoreOptions(), root=Path(shm)))
            )
    pt_dir = work / "pt"
    loader = torch.utils.data.DataLoader(
        decoded, batch_size=2, num_workers=workers, collate_fn=decode_workers.collate
    )

    def paper_pattern():
        pt_dir.mkdir(exist_ok=True)
        for positions, images, _ in loader:
            feats = enc.encode(enc.normalize(images.to(device))).to(torch.bfloat16).cpu()
            for pos, f in zip(positions.tolist(), feats, strict=True):
                torch.save(f.clone(), pt_dir / f"{records[pos].image_id}.pt")

    c = timed(paper_pattern, device)
    rows = [
        ("(a) model alone, pixels and features back in pinned memory", n / a, "1.00", ""),
        (f"(b) encode stage, JPEG -> float16 store ({workers} decode workers)", n / b, f"b/a = {a / b:.2f}",
         result.timing()),
        (f"(b) without the model build ({load_s:.1f} s)", n / (b - load_s), f"b/a = {a / (b - load_s):.2f}", ""),
        # what a run of any length pays per image: the steps that grow with the images, without the fixed start
        # and end (setup, model load, workers start, finish), which a COCO-sized store spreads thin
        (f"(b) its per-image steps ({per_image_s:.2f} s: {', '.join(per_image_steps)})", n / per_image_s,
         f"b/a = {a / per_image_s:.2f}", ""),
        *((label, n / t, f"b/a = {a / t:.2f}", r.timing()) for label, t, r in variants),
        ("(c) paper pattern: batch 2, torch.save per image", n / c, f"b/c = {c / b:.2f}", ""),
    ]  # fmt: skip
    return rows, result.store_path


def host_costs(device: torch.device) -> str:
    """What the host pays per MB to touch fresh memory (page faults) and to copy features back from the device,
    pageable against pinned: the costs the encode stage's main thread pays per batch."""
    mb = 64
    fresh = min(timed(lambda: torch.empty(mb << 20, dtype=torch.uint8).fill_(1), device) for _ in range(5))
    reused_buffer = torch.empty(mb << 20, dtype=torch.uint8)
    reused = min(timed(lambda: reused_buffer.fill_(1), device) for _ in range(5))
    line = f"host: fill {mb} MB fresh {1e3 * fresh:.1f} ms, reused {1e3 * reused:.1f} ms"
    # a shard file in one write call, as the store writes it, against one call per 256 kB (one per image before)
    pieces = [memoryview(reused_buffer.numpy()[i : i + (256 << 10)]) for i in range(0, mb << 20, 256 << 10)]
    with tempfile.TemporaryDirectory() as tmp:
        per_piece = min(timed(lambda: _write_each(Path(tmp, "a"), pieces), device) for _ in range(3))
        one_call = min(timed(lambda: write_file(Path(tmp, "b"), list(pieces)), device) for _ in range(3))
    line += (f"; write {mb} MB to {tempfile.gettempdir()}: {len(pieces)} calls {1e3 * per_piece:.1f} ms, "
             f"one call {1e3 * one_call:.1f} ms")  # fmt: skip
    if device.type == "cuda":
        on_device = torch.ones(mb << 20, dtype=torch.uint8, device=device)
        pinned = torch.empty(mb << 20, dtype=torch.uint8, pin_memory=True)
        pageable = min(timed(lambda: on_device.cpu(), device) for _ in range(5))
        into_pinned = min(timed(lambda: pinned.copy_(on_device), device) for _ in range(5))
        line += f"; copy {mb} MB device -> host: pageable {1e3 * pageable:.1f} ms, pinned {1e3 * into_pinned:.1f} ms"
    return line


def _write_each(path: Path, pieces: list[memoryview]) -> None:
    with open(path, "wb", buffering=0) as f:
        for piece in pieces:
            f.write(piece)


def train_rows(store_path: Path, s: dict, device: torch.device) -> Iterator[str]:
    """Steps/s streamed vs resident on the device, per compute dtype and compile setting, with peak memory; each
    table row as soon as it is measured (a run cut short keeps what it printed). A setting that does not fit in
    the device's memory is a row that says so."""
    store = open_encoded(store_path)
    pre = StoreInfo.of(store).preprocessing
    # bf16 at every batch; float32 eager at the largest only (the slowest setting, and one nobody would train
    # with on a GPU)
    settings = [(batch, torch.bfloat16, c) for batch in s["train_batches"] for c in s["compile"]]
    settings += [(max(s["train_batches"]), torch.float32, False)]
    for batch, compute_dtype, compiled in (
        settings if device.type == "cuda" else [(s["batch"], torch.float32, False)]
    ):
        cfg = TrainConfig(batch_size=batch, shuffle_buffer_images=4 * batch, compile=bool(compiled))
        torch.manual_seed(0)
        model = train.build_model(cfg, store).to(device)
        if (
            compiled
        ):  # once for every data path; "reduce-overhead": CUDA graphs, for steps bound by kernel launches
            model = torch.compile(model, mode=compiled if isinstance(compiled, str) else None)
        times, first, name = {}, {}, str(compute_dtype).removeprefix("torch.")
        try:
            for path in ("resident", "worker", "thread"):
                times[path], peak, first[path] = _train_steps(model, store, cfg, pre, device, compute_dtype,
                                                              s["train_steps"], path)  # fmt: skip
        except torch.OutOfMemoryError:
            yield f"| {batch} | {name} | {compiled} | out of memory | | | | |"
            continue
        finally:
            del model
            torch._dynamo.reset()  # a compiled row's graphs (and CUDA graphs' memory pool) end with it
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rate = s["train_steps"] / times["worker"]
        yield (f"| {batch} | {name} | {compiled} | {rate:.2f} | {rate * batch:.0f} "
               f"| {times['resident'] / times['worker']:.2f} | {times['resident'] / times['thread']:.2f} "
               f"| {first['worker']:.2f}, {first['thread']:.2f} | {peak:.1f} |")  # fmt: skip


def _train_steps(
    model, store, cfg, pre, device, compute_dtype, n_steps: int, path: str
) -> tuple[float, float, float]:
    """Seconds for `n_steps` training steps, the peak GPU GiB and the loader's seconds to its first batch.
    `path`: batches resident on the device, or streamed by the train stage's loader (`EpochBatches`) from its
    worker process ("worker") or a thread of this process ("thread"), timed from its first batch (its start is
    once per training run, not per step)."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = train.lr_schedule(opt, cfg, 2 * n_steps + 2)

    source = itertools.chain.from_iterable(
        batch_stream(store, cfg.batch_size, cfg.seed, epoch, cfg.shuffle_buffer_images)
        for epoch in itertools.count()
    )
    warm = [tuple(torch.as_tensor(a).to(device) for a in next(source)) for _ in range(3)]
    for f, p in warm:  # compile and allocator warm-up, outside the timing
        train.train_step(model, opt, sched, f, p, cfg, pre, device, compute_dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first_batch_s = float("nan")
    if path == "resident":
        batches = iter([tuple(torch.as_tensor(a).to(device) for a in next(source)) for _ in range(n_steps)])
    else:
        start = time.perf_counter()
        epochs = EpochBatches(store, cfg.batch_size, cfg.seed, range(n_steps), cfg.shuffle_buffer_images,
                              cfg.prefetch_batches, pin=device.type == "cuda", workers=int(path == "worker"))  # fmt: skip
        batches = itertools.islice((batch for epoch in range(n_steps) for batch in epochs.of(epoch)), n_steps)
        first = next(batches)
        first_batch_s = time.perf_counter() - start
        batches = itertools.chain([first], batches)

    def steps():
        losses = StepScalars()
        for step, (f, p) in enumerate(batches):
            losses.add(step, train.train_step(model, opt, sched, f, p, cfg, pre, device, compute_dtype))
        losses.read()

    try:
        seconds = timed(steps, device)
    finally:  # an out-of-memory row must not leave its loader's worker running through the next rows
        if path != "resident":
            epochs.close()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak, first_batch_s


def largest_batch(store_path: Path, s: dict, device: torch.device) -> int:
    """The largest power-of-two batch whose bf16 training step fits on the device (0: not searched)."""
    store = open_encoded(store_path)
    pre = StoreInfo.of(store).preprocessing
    features, pixels = (torch.as_tensor(a) for a in next(batch_stream(store, 1, 0, 0, 1)))
    fits, size = 0, s["batch"]
    while s["max_batch"] and size <= s["max_batch"]:
        try:
            _one_step(store, pre, features, pixels, size, device)
        except (torch.OutOfMemoryError, RuntimeError) as e:  # cuBLAS and cuDNN report theirs as RuntimeError
            if "out of memory" not in str(e).lower() and "alloc" not in str(e).lower():
                raise
            break
        finally:  # the step's model, optimiser and batch are gone with its frame
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        fits, size = size, 2 * size
    return fits


def _one_step(store, pre, features, pixels, size: int, device: torch.device) -> None:
    cfg = TrainConfig(batch_size=size)
    model = train.build_model(cfg, store).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    f = features.to(device).expand(size, *features.shape[1:])
    p = pixels.to(device).expand(size, *pixels.shape[1:])
    train.train_step(model, opt, train.lr_schedule(opt, cfg, 4), f, p, cfg, pre, device, torch.bfloat16)
    synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (what the test runs)")
    parser.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--resolution", type=int, action="append", help="only these (default: 224 and 512)")
    parser.add_argument("--encode-only", action="store_true", help="no training rows")
    parser.add_argument(
        "--train-only", action="store_true", help="no encode rows (one stage run makes the store)"
    )
    parser.add_argument(
        "--train-batch", type=int, action="append", help="only these train batches (default: 10, 64)"
    )
    args = parser.parse_args(argv)
    s = dict(SETTINGS["smoke" if args.smoke else "full"])
    s["train_batches"] = tuple(args.train_batch or s["train_batches"])
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"# device: {name}; torch {torch.__version__}; {os.cpu_count()} CPU cores, {args.workers} decode workers"
    )
    print(host_costs(device), flush=True)
    for resolution in args.resolution or s["resolutions"]:
        spec = EncoderSpec(name=f"vit-b16-{resolution}", backend="timm", model_id=s["model"], resolution=resolution,
                           patch_size=16, preprocessing_source="timm_pretrained_cfg", weights="random")  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            if args.train_only:
                store_path = train_store(Path(tmp), spec, s, device, args.workers)
            else:
                rows, store_path = encode_rows(Path(tmp), spec, s, device, args.workers)
                print(f"\n## {name}: encode, {s['model']} @ {resolution} px, {s['images']} JPEGs 640x480, "
                      f"batch {s['batch']}\n\n| path | images/s | ratio | the stage's time (s) |\n|---|---|---|---|")  # fmt: skip
                for path, rate, ratio, timing in rows:
                    print(f"| {path} | {rate:.0f} | {ratio} | {timing} |", flush=True)
            if args.encode_only:
                continue
            print(f"\n## {name}: train, default reconstructor on the {resolution} px store, {s['train_steps']} "
                  "steps from the loader's first batch\n\n| batch | compute | compile | steps/s streamed | images/s "
                  "| streamed / resident on the device | the same, loader on a thread | loader's first batch, "
                  "worker and thread (s) | peak GPU GiB |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
            for row in train_rows(store_path, s, device):
                print(row, flush=True)
            print(f"\nlargest bf16 batch that fits: {largest_batch(store_path, s, device) or 'not searched'}")


if __name__ == "__main__":
    main()
