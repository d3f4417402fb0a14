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
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(features, pixels) batches of one epoch: shards in a seeded order through a bounded shuffle buffer.
    Features come in the stored float dtype (float16 stores: float16; the consumer converts on its device).
    `pixels=False` never reads the pixels (None in their place); the batches of features are the same."""
    rng = np.random.default_rng([seed, epoch])
    lay = store.layout
    pool_feats: list[np.ndarray] = []
    pool_pixels: list[np.ndarray] = []

    def draw(n: int):
        picks = sorted(rng.choice(len(pool_feats), size=n, replace=False), reverse=True)
        out = [(pool_feats[i], pool_pixels[i]) for i in picks]
        for i in picks:  # swap-remove: O(1) per image, no copying of the pool
            pool_feats[i], pool_pixels[i] = pool_feats[-1], pool_pixels[-1]
            pool_feats.pop()
            pool_pixels.pop()
        return np.stack([f for f, _ in out]), np.stack([p for _, p in out]) if pixels else None

    for shard in rng.permutation(lay.n_shards):
        rows = lay.shard_slice(int(shard))
        valid = store.group["valid"][rows]
        feats = store.features(rows, as_stored=True)[valid]  # float16 stays half-size until the device
        pool_feats.extend(np.array(f) for f in feats)  # own copies, so the shard's arrays are freed
        if pixels:
            pool_pixels.extend(np.array(p) for p in store.pixels(rows)[valid])
        else:
            pool_pixels.extend([None] * len(feats))
        while len(pool_feats) >= buffer_images + batch_size:
            yield draw(batch_size)
    while pool_feats:
        yield draw(min(batch_size, len(pool_feats)))


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
                tensors = [None if a is None else torch.from_numpy(a) for a in arrays]
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
