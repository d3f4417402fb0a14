"""Streaming (features, pixels) batches from a feature store for training: shards read whole in a seeded order,
a bounded in-memory shuffle buffer, and a worker process (the train stage) or a background thread (the token and
SAE studies) that reads ahead. Memory depends on the buffer, not the store.
"""

from __future__ import annotations

import queue
import shutil
import threading
from collections.abc import Iterator

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
    process that stays for all of them (each shard's checksum is verified once, as by one store handle); batches
    come through shared memory, pinned here for a GPU. On a thread of the training process the same loader took
    the GIL from the training loop: a CPU stand-in for a ~25 ms dispatch-bound step (the paper's batch of 10 at
    224 px on an H200, which trained at 0.88 of its rate with the batches already on the GPU) ran at 0.88 of its
    speed alone with the loader on a thread and 0.98 with it in its worker (benchmarks/loader_contention.py). `workers=0` reads on a thread here instead (Prefetcher), as does the
    default where /dev/shm cannot hold the batches in flight (a container's default is 64 MB)."""

    def __init__(self, store: FeatureStore, batch_size: int, seed: int, epochs: range, buffer_images: int,
                 depth: int, pin: bool, workers: int | None = None):  # fmt: skip
        if workers is None:
            workers = int(shared_memory_fits(store, batch_size, depth))
        self.in_worker = bool(workers)
        if workers:
            loader = torch.utils.data.DataLoader(
                _Epochs(store.path, batch_size, seed, epochs, buffer_images), batch_size=None, num_workers=1,
                prefetch_factor=depth, pin_memory=pin, multiprocessing_context=worker_processes.context(),
                worker_init_fn=worker_processes.init(),
            )  # fmt: skip
            self._items = worker_processes.started(loader)
        else:
            self._items = iter(
                Prefetcher(_tagged(store, batch_size, seed, epochs, buffer_images), depth, pin)
            )
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
        """Stop the worker (also when training stops early)."""
        self._items = iter(())


def shared_memory_fits(store: FeatureStore, batch_size: int, depth: int) -> bool:
    """Whether /dev/shm has room for twice the batches a worker keeps in flight (float32-sized, an upper bound)."""
    layout = store.layout
    h, w = layout.grid_hw
    image_bytes = h * w * (layout.hidden_dim + 1) * 4 + layout.pixel_size**2 * 3
    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError:  # no /dev/shm (not Linux)
        return False
    return free >= 2 * (depth + 2) * batch_size * image_bytes


class _Epochs(torch.utils.data.IterableDataset):
    """In the worker: its own handle on the store, the batches of every epoch tagged with the epoch."""

    def __init__(self, store_path, batch_size: int, seed: int, epochs: range, buffer_images: int):
        self.args = store_path, batch_size, seed, epochs, buffer_images

    def __iter__(self):
        store_path, *args = self.args
        return _tagged(open_store(store_path), *args)


def _tagged(store: FeatureStore, batch_size: int, seed: int, epochs: range, buffer_images: int):
    for epoch in epochs:
        for features, pixels in batch_stream(store, batch_size, seed, epoch, buffer_images):
            yield torch.tensor(epoch), features, pixels


class Prefetcher:
    """Runs a batch iterator on a background thread, `depth` batches ahead, as (pinned) torch tensors."""

    def __init__(self, iterator: Iterator, depth: int, pin: bool):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.pin = pin
        self.thread = threading.Thread(target=self._fill, args=(iterator,), daemon=True)
        self.thread.start()

    def _fill(self, iterator: Iterator) -> None:
        try:
            for arrays in iterator:
                tensors = [None if a is None else torch.as_tensor(a) for a in arrays]  # no copy
                if self.pin:
                    tensors = [None if t is None else t.pin_memory() for t in tensors]
                self.queue.put(tuple(tensors))
        except BaseException as e:  # re-raised in the consumer
            self.queue.put(e)
            return
        self.queue.put(None)

    def __iter__(self):
        while (item := self.queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
