"""Streaming (features, pixels) batches from a feature store for training: shards read whole in a seeded order,
a bounded in-memory shuffle buffer, and a background prefetch thread. Memory depends on the buffer, not the store.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch

from storage import FeatureStore


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
