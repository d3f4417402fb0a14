"""The encode stage's side of writing a store: shard buffers filled batch by batch, per-shard value statistics
taken on the device, and a background thread that writes finished shards."""

from __future__ import annotations

import math
import queue
import threading
import time

import numpy as np
import torch

from pipeline.data.datasets import ImageRecord
from storage import FeatureStore, StoreLayout
from storage.precision import FLOAT16_MAX


def shard_buffer(layout: StoreLayout, shard: int, n: int, spent: dict | None = None) -> dict:
    """One shard's rows before writing, held as the store keeps them: `add_batch` quantises on the device (NumPy
    costs per ViT-B@512 image: float16 cast 4.4 ms, bf16 rounding 7.3 ms, int8 codes 6.3 ms, on the writer
    thread; torch on a GPU: next to nothing).

    `spent`: a written shard's buffer (`BackgroundShardWriter.spent`), whose arrays are reset and used again when
    they have this shard's shape. New arrays cost a page fault per 4 KiB at the first write: copying a ViT-B@512
    batch into them took 4.9 ms per image on this project's CPU, against ~0.5 ms into arrays written before."""
    h, w = layout.grid_hw
    stored_dtype = {"float16": np.float16, "int8_per_token": np.int8}.get(layout.precision, np.float32)
    shapes = {
        "features": ((n, h, w, layout.hidden_dim), stored_dtype, 0),
        **({"features_scale": ((n, h, w), np.float32, 1)} if layout.precision == "int8_per_token" else {}),
        "pixels": ((n, layout.pixel_size, layout.pixel_size, 3), np.uint8, 0),
        **({"embeddings": ((n, layout.embedding_dim), np.float32, 0)} if layout.embedding_dim else {}),
    }
    reuse = spent is not None and all(
        name in spent and spent[name].shape == shape and spent[name].dtype == dtype
        for name, (shape, dtype, _) in shapes.items()
    )
    arrays = {}
    for name, (shape, dtype, fill) in shapes.items():
        if reuse:
            arrays[name] = spent[name]
            arrays[name].fill(fill)  # an image that fails to decode keeps these values, as in a new buffer
        else:
            arrays[name] = np.full(shape, fill, dtype) if fill else np.zeros(shape, dtype)
    return {
        "shard": shard,
        "precision": layout.precision,
        **arrays,
        "stats": None,
        "failures": [],
        "n_filled": 0,
    }


def add_batch(
    buffer: dict, rows: np.ndarray, features_nhwd: torch.Tensor, seconds: dict | None = None
) -> None:
    """Features of the buffer's `rows` in the store's precision; statistics taken in float32 before any cast.
    `seconds` gets the time to the features' arrival on the host ("to host") and of the copy into the buffer
    ("into buffers")."""
    start = time.perf_counter()
    stats = feature_stats(features_nhwd)
    buffer["stats"] = _add_stats(buffer["stats"], stats)
    stored, scale = quantize(features_nhwd, buffer["precision"], finite=stats["n_nonfinite"] == 0)
    on_host = _on_host(stored)
    copying = time.perf_counter()
    buffer["features"][rows] = on_host
    if scale is not None:
        buffer["features_scale"][rows] = _on_host(scale)
    if seconds is not None:
        seconds["to host"] += copying - start
        seconds["into buffers"] += time.perf_counter() - copying


def _on_host(x: torch.Tensor) -> np.ndarray:
    """`x` as a host array; from a GPU through a reused pinned buffer: on an H200 machine a device-to-host copy
    into pageable memory ran at 1.2 GB/s, into pinned memory at 50 GB/s (benchmarks/gpu.py's `host:` line), and
    a batch of ViT-B@224 features is 19-39 MB. Valid until this thread's next call with the same dtype."""
    if x.device.type != "cuda":
        return x.numpy()
    flat = getattr(_staging, str(x.dtype), None)
    if flat is None or flat.numel() < x.numel():
        flat = torch.empty(x.numel(), dtype=x.dtype, pin_memory=True)
        setattr(_staging, str(x.dtype), flat)
    staging = flat[: x.numel()].view(x.shape)
    staging.copy_(x)  # synchronous: the values are on the host when it returns
    return staging.numpy()


_staging = threading.local()  # per thread: two stages in one process never share a buffer


def quantize(
    features_nhwd: torch.Tensor, precision: str, finite: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """storage.precision.quantize in torch, where the features are: the same values, bit for bit (tested).
    `finite`: the caller knows there is no NaN or inf (skips the pass that keeps them as they are)."""
    x = features_nhwd.float()
    if precision == "float16":
        return x.to(torch.float16), None
    if precision == "bf16_bitround":
        # torch's float32 -> bfloat16 cast rounds half to even, as round_to_bf16 does
        rounded = x.to(torch.bfloat16).float()
        return (rounded if finite else torch.where(torch.isfinite(x), rounded, x)), None
    if precision == "int8_per_token":
        # a 0-d tensor on the device, not a Python number: CUDA divides by a host scalar as a multiply by its
        # reciprocal (one ulp off NumPy's division in ~4 % of scales)
        scale = x.abs().amax(dim=-1) / torch.full((), 127.0, device=x.device)
        scale = torch.where(scale > 0, scale, torch.ones((), device=x.device))
        return torch.clamp(torch.round(x / scale[..., None]), -127, 127).to(torch.int8), scale
    return x, None


def feature_stats(features_nhwd: torch.Tensor) -> dict:
    """The numbers recorded per shard (storage.precision.value_stats, computed where the features are)."""
    x = features_nhwd.float()
    n_tokens = math.prod(x.shape[:-1])
    if not x.numel():
        return {"max_abs": 0.0, "n_nonfinite": 0, "n_over_float16_max": 0, "sum_token_norm": 0.0,
                "n_tokens": n_tokens}  # fmt: skip
    low, high = (float(v) for v in torch.aminmax(x))  # NaN and inf show here (isfinite costs 10x more on CPU)
    if math.isfinite(low) and math.isfinite(high):
        clean, n_nonfinite, max_abs = x, 0, max(-low, high)
    else:
        finite = torch.isfinite(x)
        clean = torch.where(finite, x, torch.zeros((), device=x.device))
        n_nonfinite, max_abs = int((~finite).sum()), float(clean.abs().max())
    return {
        "max_abs": max_abs,
        "n_nonfinite": n_nonfinite,
        "n_over_float16_max": int(torch.count_nonzero(clean.abs() > FLOAT16_MAX))
        if max_abs > FLOAT16_MAX
        else 0,
        "sum_token_norm": float(torch.linalg.vector_norm(clean, dim=-1).sum()),
        "n_tokens": n_tokens,
    }


def _add_stats(total: dict | None, batch: dict) -> dict:
    if total is None:
        return batch
    return {k: max(total[k], batch[k]) if k == "max_abs" else total[k] + batch[k] for k in batch}


class BackgroundShardWriter:
    """Writes finished shards on background threads so compression and disk I/O overlap the next forward.

    Several threads write different shards at once (compression, hashing and file writes release the GIL): one
    thread writes ~600 ViT-B@224 images/s (docs/benchmarks.md), less than a GPU encodes."""

    def __init__(self, store: FeatureStore, threads: int = 1):
        self.store = store
        self.jobs: queue.Queue = queue.Queue(maxsize=2 * threads)
        self.error: BaseException | None = None
        self.written: dict[int, threading.Event] = {}  # set once a shard is written (or failed)
        self._spent: queue.SimpleQueue = queue.SimpleQueue()  # buffers written, for `shard_buffer` to reuse
        self.ok: set[int] = set()
        self.threads = [
            threading.Thread(target=self._loop, name=f"shard-writer-{i}", daemon=True) for i in range(threads)
        ]
        for thread in self.threads:
            thread.start()

    def put(self, buffer: dict, shard_records: list[ImageRecord]) -> None:
        if self.error:
            raise self.error
        self.written.setdefault(buffer["shard"], threading.Event())
        self.jobs.put((buffer, shard_records))

    def spent(self) -> dict | None:
        """A buffer this writer has finished with, if there is one."""
        try:
            return self._spent.get_nowait()
        except queue.Empty:
            return None

    def wrote(self, shard: int) -> bool:
        """Wait until this writer is done with `shard`; whether it was written."""
        self.written[shard].wait()
        return shard in self.ok

    def _loop(self) -> None:
        while (item := self.jobs.get()) is not None:
            buffer, shard_records = item
            try:
                if self.error:
                    continue
                failed_ids = {f["image_id"] for f in buffer["failures"]}
                image_ids = np.array([r.image_id for r in shard_records], np.int64)
                valid = np.array([r.image_id not in failed_ids for r in shard_records])
                record = {
                    "n_encoded": int(valid.sum()),
                    "failures": buffer["failures"],
                    "stats": buffer["stats"] or feature_stats(torch.zeros(0, 1)),
                }
                pixels = buffer["pixels"] if self.store.layout.store_pixels else None
                leader = buffer["pixels_from"]
                pixels_like = leader.store if leader is not None and leader.wrote(buffer["shard"]) else None
                self.store.write_shard(buffer["shard"], buffer["features"], pixels, image_ids, valid, record,
                                       pixels_like, buffer.get("embeddings"), quantized=True,
                                       features_scale=buffer.get("features_scale"))  # fmt: skip
                self.ok.add(buffer["shard"])
            except BaseException as e:  # surfaced on the main thread at the next put/close
                self.error = e
            finally:
                self._spent.put(buffer)
                self.written[buffer["shard"]].set()

    def close(self, raise_errors: bool = True) -> None:
        alive = [thread for thread in self.threads if thread.is_alive()]
        for _ in alive:
            self.jobs.put(None)
        for thread in alive:
            thread.join()
        if raise_errors and self.error:
            raise self.error
