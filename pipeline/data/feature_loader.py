"""Streaming (features, pixels) batches from a feature store for training: shards read whole in a seeded order,
a bounded in-memory shuffle buffer, and a worker process (the train stage) or a background thread (the token and
SAE studies) that reads ahead. Memory depends on the buffer, not the store.
"""

from __future__ import annotations

import queue
import shutil
import threading
import traceback
from collections.abc import Iterator
from contextlib import suppress

import numpy as np
import torch

from pipeline.data import worker_processes
from storage import FeatureStore, open_store


def batch_stream(
    store: FeatureStore, batch_size: int, seed: int, epoch: int, buffer_images: int, pixels: bool = True
) -> Iterator[tuple[np.ndarray | torch.Tensor, np.ndarray | None]]:
    """(features, pixels) batches of one epoch: shards in a seeded order through a bounded shuffle buffer.
    Features come as stored, for `widen` to turn into float32 on the consumer's device: float16 stores as
    float16; bf16_bitround stores, whose float32 values are bf16 values, as a torch bfloat16 tensor (NumPy has no
    bf16); int8_per_token stores as int8 codes with each token's float32 scale in 4 more bytes at the end of its
    vector [B, H, W, D + 4]. Half or a quarter of float32's bytes to shuffle, pin and move, widened exactly on
    the device. `pixels=False` never reads the pixels (None in their place); the batches of features are the same.

    The buffer is one preallocated array of slots (buffer + a shard + a batch): a shard's images are copied into
    free slots and a batch gathered from drawn slots, so memory is fixed and no image is allocated on its own
    (per-image arrays cost their page faults: ~0.4 ms per 512 px image of ViT-B features)."""
    rng = np.random.default_rng([seed, epoch])
    lay = store.layout
    valid_rows = store.valid()
    capacity = buffer_images + batch_size + lay.shard_images
    slot_features = slot_pixels = staging = None
    # The high half of each little-endian float32 is its bf16 value exactly: bf16-rounded values have zero low
    # halves (a NaN whose payload sits only in the low half would read as inf; reconlab writes canonical NaNs)
    as_bf16 = lay.precision == "bf16_bitround" and np.little_endian
    as_int8 = lay.precision == "int8_per_token" and np.little_endian  # scale bytes read back on the device
    free = list(range(capacity - 1, -1, -1))
    pool: list[int] = []  # slots holding an image, in the order the draws see them

    def draw(n: int):
        picks = sorted(rng.choice(len(pool), size=n, replace=False), reverse=True)
        slots = [pool[i] for i in picks]
        for i in picks:  # swap-remove: O(1) per image
            pool[i] = pool[-1]
            pool.pop()
        free.extend(slots)
        features = slot_features[slots]
        features = torch.from_numpy(features).view(torch.bfloat16) if as_bf16 else features
        return features, slot_pixels[slots] if pixels else None

    for shard in rng.permutation(lay.n_shards):
        rows = lay.shard_slice(int(shard))
        keep = np.flatnonzero(valid_rows[rows]) + rows.start
        if not keep.size:
            continue
        # float16 stays half-size until the device; read into one reused buffer per array
        if as_int8:
            codes, scale = store.int8_codes(keep)
            feats = np.concatenate([codes, scale[..., None].view(np.int8)], axis=-1)
        else:
            feats = store.features(
                keep, as_stored=True, out=None if staging is None else staging[0][: keep.size]
            )
        if as_bf16:
            feats = feats.view(np.uint16)[..., 1::2]
        if slot_features is None:
            slot_features = np.empty((capacity, *feats.shape[1:]), feats.dtype)
        slots = [free.pop() for _ in range(len(keep))]
        slot_features[slots] = feats
        images = (
            store.pixels(keep, out=None if staging is None else staging[1][: keep.size]) if pixels else None
        )
        if pixels:
            if slot_pixels is None:
                slot_pixels = np.empty((capacity, *images.shape[1:]), images.dtype)
            slot_pixels[slots] = images
        if staging is None:
            staging = (np.empty((lay.shard_images, *feats.shape[1:]), np.float32 if as_bf16 else feats.dtype),
                       None if images is None else np.empty((lay.shard_images, *images.shape[1:]), images.dtype))  # fmt: skip
        pool.extend(slots)
        while len(pool) >= buffer_images + batch_size:
            yield draw(batch_size)
    while pool:
        yield draw(min(batch_size, len(pool)))


def widen(features: torch.Tensor) -> torch.Tensor:
    """A batch of `batch_stream` (on its device) as the float32 values the store holds; float32 passes as is."""
    if features.dtype == torch.int8:  # codes, then each token's scale in its last 4 bytes
        scale = features[..., -4:].contiguous().view(torch.float32)
        return features[..., :-4].float().mul_(scale)
    return features.float()


def n_batches_per_epoch(store: FeatureStore, batch_size: int) -> int:
    return -(-int(store.valid().sum()) // batch_size)


class EpochBatches:
    """The train stage's batches of `epochs` (`batch_stream`'s, in order), read, decoded and shuffled by one worker
    process that stays for all of them (each shard's checksum is verified once, as by one store handle).

    The worker writes each batch into one of `depth` slots of shared memory made once, and a thread of this
    process copies it out (into pinned memory for a GPU) and hands the slot back. Measured on an H200 at the
    paper's batch of 10 (docs/benchmarks.md, GPU figures, run 3), as steps/s against the same batches already on
    the GPU: 224 px 0.87/0.83/1.00 (bf16 eager/compiled/float32) where reading on a thread of the training process
    gave 0.84/0.77/0.94 (the reads take the GIL from a ~25 ms dispatch-bound step); 512 px 0.95/0.94/1.00 against
    0.99/0.97/1.00. A torch DataLoader worker did worse (0.58-0.93, timed from its start, which cannot account
    for the gap): it moves every batch through fresh shared memory, whose page faults cost ~20 ms per 512 px
    batch (24 MB) here, more than reading it. The worker takes 0.2-0.6 s to its first batch, once per training
    run. `workers=0` reads on the thread instead, as does the default where /dev/shm cannot hold the slots (a
    container's default is 64 MB) and for training on the CPU: there the thread keeps 1.01-1.07 of the resident
    rate and the worker 0.86-0.89 (2 cores, tiny-vit-112, benchmarks/train.py, 2026-11-28)."""

    def __init__(self, store: FeatureStore, batch_size: int, seed: int, epochs: range, buffer_images: int,
                 depth: int, pin: bool, workers: int | None = None):  # fmt: skip
        if workers is None:
            workers = int(reads_in_a_worker(store, batch_size, depth, on_gpu=pin))
        self.in_worker = bool(workers)
        args = batch_size, seed, epochs, buffer_images
        self._worker = _SlotWorker(store.path, args, depth, pin) if workers else None
        self._prefetcher = Prefetcher(self._worker or _tagged(store, *args), depth, pin=pin and not workers)
        self._items = iter(self._prefetcher)
        self._ahead = None

    def of(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of `epoch`; epochs are asked for in order, each read to its end."""
        while (item := self._ahead or next(self._items, None)) is not None:
            self._ahead = None
            if int(item[0]) != epoch:
                self._ahead = item  # the next epoch's first batch
                return
            yield item[1], item[2]

    def close(self) -> None:
        """Stop the worker (also when training stops early): the thread first, which ends after the batch it is
        on, so that nothing sends on the worker's pipes as they close."""
        self._prefetcher.stop()
        self._prefetcher.thread.join(timeout=10)
        if self._worker is not None:
            self._worker.stop()


def reads_in_a_worker(store: FeatureStore, batch_size: int, depth: int, on_gpu: bool) -> bool:
    """The default: a worker process for a GPU's training, where /dev/shm holds its slots; a thread otherwise."""
    return on_gpu and shared_memory_fits(store, batch_size, depth)


def shared_memory_fits(store: FeatureStore, batch_size: int, depth: int) -> bool:
    """Whether /dev/shm has room for twice the worker's slots (float32-sized, an upper bound)."""
    layout = store.layout
    h, w = layout.grid_hw
    image_bytes = h * w * (layout.hidden_dim + 1) * 4 + layout.pixel_size**2 * 3
    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError:  # no /dev/shm (not Linux)
        return False
    return free >= 2 * depth * batch_size * image_bytes


class _SlotWorker:
    """`_tagged`'s batches from a worker process, through `n_slots` shared slots made once; iterating yields
    (epoch, features, pixels) copies (pinned with `pin`), each slot handed back as soon as it is copied."""

    def __init__(self, store_path, stream_args: tuple, n_slots: int, pin: bool):
        server = worker_processes.context()
        # pipes, not queues: one sender and one receiver each, and no semaphores left behind by a stopped worker
        self._filled, filled = server.Pipe(duplex=False)
        free, self._free = server.Pipe(duplex=False)
        self._process = server.Process(
            target=_fill_slots, name="reconlab-train-loader", daemon=True,
            args=(worker_processes.init(), store_path, stream_args, n_slots, filled, free),
        )  # fmt: skip
        self.pin = pin
        with worker_processes.main_hidden():
            self._process.start()
        filled.close()
        free.close()

    def __iter__(self):
        slots = None
        while (item := self._next()) is not None:
            if slots is None:
                # the worker's first message: its slots, shared once. Their file descriptors come from the
                # worker while it lives, so it has none to fill until they are here
                slots = item
                with suppress(OSError):  # stopped already
                    for slot in range(len(slots[0])):
                        self._free.send(slot)
                continue
            epoch, slot, n = item
            batch = [torch.empty((n, *s.shape[2:]), dtype=s.dtype, pin_memory=self.pin).copy_(s[slot, :n])
                     for s in slots]  # fmt: skip
            with suppress(OSError):  # the worker has finished, or was stopped
                self._free.send(slot)
            yield epoch, *batch

    def _next(self):
        try:
            item = self._filled.recv()
        except EOFError:  # the worker's end of the pipe closed without its last message
            self._process.join(timeout=10)
            raise RuntimeError(f"the train loader's worker process ended (exit code {self._process.exitcode}) "
                               "before its last batch") from None  # fmt: skip
        if isinstance(item, dict):  # the worker's exception, raised here as itself (a damaged store)
            in_worker = RuntimeError(f"the train loader's worker process failed:\n{item['traceback']}")
            if item["error"] is None:
                raise in_worker
            raise item["error"] from in_worker
        return item

    def stop(self) -> None:
        """The worker's next wait for a slot ends it, and it exits as a process should (a terminated one left
        semaphores registered with multiprocessing's resource tracker, which warned of them at exit); it is
        terminated if it has not ended in 10 s."""
        self._free.close()
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join()


def _fill_slots(start, store_path, stream_args: tuple, n_slots: int, filled, free) -> None:
    """In the worker process: each batch into a free slot, its (epoch, slot, images) to the consumer."""
    start(0)
    # as in a DataLoader's workers: OpenMP threads copying a batch spin against the training process's threads
    torch.set_num_threads(1)
    try:
        slots = None
        for epoch, *arrays in _tagged(open_store(store_path), *stream_args):
            batch = [torch.as_tensor(a) for a in arrays]
            if slots is None:
                batch_size = stream_args[0]
                slots = [torch.empty((n_slots, batch_size, *t.shape[1:]), dtype=t.dtype).share_memory_()
                         for t in batch]  # fmt: skip
                filled.send(slots)
            slot = free.recv()
            for s, t in zip(slots, batch, strict=True):
                s[slot, : len(t)].copy_(t)
            filled.send((epoch, slot, len(batch[0])))
        filled.send(None)
    except (EOFError, BrokenPipeError):  # the consumer stopped
        pass
    except Exception as e:  # the consumer raises it
        failed = {"error": e, "traceback": traceback.format_exc()}
        with suppress(OSError):
            try:
                filled.send(failed)
            except Exception:  # an exception that does not pickle: its traceback alone
                filled.send({**failed, "error": None})


def _tagged(store: FeatureStore, batch_size: int, seed: int, epochs: range, buffer_images: int):
    for epoch in epochs:
        for features, pixels in batch_stream(store, batch_size, seed, epoch, buffer_images):
            yield epoch, features, pixels


class Prefetcher:
    """Runs a batch iterator on a background thread, `depth` batches ahead, as (pinned) torch tensors."""

    def __init__(self, iterator: Iterator, depth: int, pin: bool):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.pin = pin
        self._stopped = threading.Event()
        self.thread = threading.Thread(target=self._fill, args=(iterator,), daemon=True)
        self.thread.start()

    def _fill(self, iterator: Iterator) -> None:
        try:
            for arrays in iterator:
                tensors = [None if a is None else torch.as_tensor(a) for a in arrays]  # no copy
                if self.pin:
                    tensors = [None if t is None else t.pin_memory() for t in tensors]
                if not self._put(tuple(tensors)):
                    return
        except BaseException as e:  # re-raised in the consumer
            self._put(e)
            return
        self._put(None)

    def _put(self, item) -> bool:
        while not self._stopped.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                pass
        return False

    def stop(self) -> None:
        """The thread ends within 0.2 s of its next batch, ahead of the consumer or not."""
        self._stopped.set()

    def __iter__(self):
        while (item := self.queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
