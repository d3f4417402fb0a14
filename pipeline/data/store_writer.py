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


def shard_buffer(
    layout: StoreLayout, shard: int, n: int, spent: dict | None = None, pinned: bool = False
) -> dict:
    """One shard's rows before writing, held as the store keeps them: `add_batch` quantises on the device (NumPy
    costs per ViT-B@512 image: float16 cast 4.4 ms, bf16 rounding 7.3 ms, int8 codes 6.3 ms, on the writer
    thread; torch on a GPU: next to nothing).

    `spent`: a written shard's buffer (`BackgroundShardWriter.spent`), whose arrays are reset and used again when
    they have this shard's shape. New arrays cost a page fault per 4 KiB at the first write: copying a ViT-B@512
    batch into them took 4.9 ms per image on this project's CPU, against ~0.5 ms into arrays written before.
    `pinned`: the arrays of device results are page-locked (torch's pinned memory, under `buffer["pinned"]`), so
    that a GPU copies features straight into them while the host goes on (an H200 machine copied 64 MB device -> host in 1.3 ms
    into pinned memory, 58.7 ms into pageable memory: benchmarks/gpu.py's `host:` line)."""
    h, w = layout.grid_hw
    stored_dtype = {"float16": np.float16, "int8_per_token": np.int8}.get(layout.precision, np.float32)
    shapes = {
        "features": ((n, h, w, layout.hidden_dim), stored_dtype, 0),
        **({"features_scale": ((n, h, w), np.float32, 1)} if layout.precision == "int8_per_token" else {}),
        "pixels": ((n, layout.pixel_size, layout.pixel_size, 3), np.uint8, 0),
        **({"embeddings": ((n, layout.embedding_dim), np.float32, 0)} if layout.embedding_dim else {}),
    }
    reuse = (
        spent is not None
        and ("pinned" in spent) == pinned
        and all(
            name in spent and spent[name].shape == shape and spent[name].dtype == dtype
            for name, (shape, dtype, _) in shapes.items()
        )
    )
    arrays, page_locked = {}, {}
    for name, (shape, dtype, fill) in shapes.items():
        if reuse:
            arrays[name] = spent[name]
            arrays[name].fill(fill)  # an image that fails to decode keeps these values, as in a new buffer
            if name in spent.get("pinned", {}):
                page_locked[name] = spent["pinned"][name]
        elif pinned and name != "pixels":  # the arrays a GPU copies into (pixels come from the host)
            page_locked[name] = torch.empty(shape, dtype=_TORCH_DTYPES[dtype], pin_memory=True)
            arrays[name] = page_locked[name].numpy()  # the same memory; the array keeps the tensor alive
            arrays[name].fill(fill)
        else:
            arrays[name] = np.full(shape, fill, dtype) if fill else np.zeros(shape, dtype)
    return {
        "shard": shard,
        "precision": layout.precision,
        **arrays,
        **({"pinned": page_locked} if pinned else {}),
        "stats": None,
        "failures": [],
        "n_filled": 0,
    }


_TORCH_DTYPES = {np.float16: torch.float16, np.float32: torch.float32, np.int8: torch.int8}


class Landing:
    """One batch's results on their way from the device into shard buffers. On a GPU the statistics and copies are
    queued behind the batch's forward and `wait` returns once they are on the host: the encode stage launches
    the next batch before it waits for this one, so the GPU computes while the host handles the batch before
    (without it the GPU idled through every batch's host work: GPU figures, run 3). On a CPU everything is done
    when it is asked for and `wait` only merges the statistics."""

    def __init__(self, device: torch.device):
        self.device = device
        self.queued = device.type == "cuda"
        self.event: torch.cuda.Event | None = None
        self.stats: list[tuple[dict, dict | torch.Tensor, int]] = []  # (buffer, statistics, tokens)

    def copy(self, buffer: dict, name: str, rows: np.ndarray, values: torch.Tensor) -> None:
        """`values` into `buffer[name][rows]`."""
        start, stop = int(rows[0]), int(rows[0]) + len(rows)
        if not np.array_equal(rows, np.arange(start, stop)):
            # rows around a failed image (rare): here and now
            buffer[name][rows] = values.cpu().numpy()
        elif self.queued and "pinned" in buffer:  # the usual batch on a GPU: straight into the buffer, queued
            buffer["pinned"][name][start:stop].copy_(values, non_blocking=True)
        else:
            buffer[name][start:stop] = values.cpu().numpy()

    def add_stats(self, buffer: dict, features_nhwd: torch.Tensor) -> bool:
        """The batch's statistics for `buffer`'s shard; whether its values are known to be all finite."""
        n_tokens = math.prod(features_nhwd.shape[:-1])
        if not self.queued or not features_nhwd.numel():
            stats = feature_stats(features_nhwd)
            self.stats.append((buffer, stats, n_tokens))
            return stats["n_nonfinite"] == 0
        on_device = _stats_tensor(features_nhwd)
        on_host = torch.empty(on_device.shape, dtype=on_device.dtype, pin_memory=True)
        on_host.copy_(on_device, non_blocking=True)
        self.stats.append((buffer, on_host, n_tokens))
        return False  # not known without waiting for the device

    def queue_done(self) -> None:
        """Every copy of the batch is asked for."""
        if self.queued:
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(self.device))

    def wait(self) -> None:
        """Until the batch is on the host; its statistics then join its shards'."""
        if self.event is not None:
            self.event.synchronize()
        for buffer, stats, n_tokens in self.stats:
            if isinstance(stats, torch.Tensor):
                stats = _as_stats(stats.tolist(), n_tokens)
            buffer["stats"] = _add_stats(buffer["stats"], stats)
        self.stats = []


def add_batch(
    buffer: dict,
    rows: np.ndarray,
    features_nhwd: torch.Tensor,
    seconds: dict | None = None,
    landing: Landing | None = None,
) -> None:
    """Features of the buffer's `rows` in the store's precision; statistics taken in float32 before any cast.
    With a `landing`, the copies are queued on it (the caller waits); without, they are on the host at return.
    `seconds["to host"]` gets the time spent here."""
    start = time.perf_counter()
    own = landing is None
    landing = landing or Landing(features_nhwd.device)
    finite = landing.add_stats(buffer, features_nhwd)
    stored, scale = quantize(features_nhwd, buffer["precision"], finite=finite)
    landing.copy(buffer, "features", rows, stored)
    if scale is not None:
        landing.copy(buffer, "features_scale", rows, scale)
    if own:
        landing.queue_done()
        landing.wait()
    if seconds is not None:
        seconds["to host"] += time.perf_counter() - start


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
    if not (math.isfinite(low) and math.isfinite(high)):
        return _as_stats(_stats_tensor(x).tolist(), n_tokens)
    max_abs = max(-low, high)
    return {
        "max_abs": max_abs,
        "n_nonfinite": 0,
        "n_over_float16_max": int(torch.count_nonzero(x.abs() > FLOAT16_MAX)) if max_abs > FLOAT16_MAX else 0,
        "sum_token_norm": float(torch.linalg.vector_norm(x, dim=-1).sum()),
        "n_tokens": n_tokens,
    }


def _as_stats(values: list[float], n_tokens: int) -> dict:
    """`_stats_tensor`'s numbers, read back, as `feature_stats` returns them."""
    max_abs, n_nonfinite, n_over, sum_token_norm = values
    return {"max_abs": max_abs, "n_nonfinite": int(n_nonfinite), "n_over_float16_max": int(n_over),
            "sum_token_norm": sum_token_norm, "n_tokens": n_tokens}  # fmt: skip


def _stats_tensor(features_nhwd: torch.Tensor) -> torch.Tensor:
    """`feature_stats`' max_abs, n_nonfinite, n_over_float16_max and sum_token_norm as one float64 tensor where
    the features are, asked for without waiting for them (the same numbers: the same float32 reductions, widened
    exactly; the counts are exact below 2**53)."""
    x = features_nhwd.float()
    finite = torch.isfinite(x)
    clean = torch.where(finite, x, torch.zeros((), device=x.device))
    magnitude = clean.abs()
    return torch.stack(
        [
            value.double()
            for value in (
                magnitude.amax(),
                (~finite).sum(),
                (magnitude > FLOAT16_MAX).sum(),
                torch.linalg.vector_norm(clean, dim=-1).sum(),
            )
        ]
    )


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
