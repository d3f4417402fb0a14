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
    store: FeatureStore, batch_size: int, seed: int, epoch: int, buffer_images: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(features, pixels) batches of one epoch: shards in a seeded order through a bounded shuffle buffer."""
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
        return np.stack([f for f, _ in out]), np.stack([p for _, p in out])

    for shard in rng.permutation(lay.n_shards):
        rows = lay.shard_slice(int(shard))
        valid = store.group["valid"][rows]
        feats, pixels = store.features(rows)[valid], store.pixels(rows)[valid]
        pool_feats.extend(np.array(f) for f in feats)  # own copies, so the shard's arrays are freed
        pool_pixels.extend(np.array(p) for p in pixels)
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
            for feats, pixels in iterator:
                f, p = torch.from_numpy(feats), torch.from_numpy(pixels)
                self.queue.put((f.pin_memory(), p.pin_memory()) if self.pin else (f, p))
        except BaseException as e:  # re-raised in the consumer
            self.queue.put(e)
            return
        self.queue.put(None)

    def __iter__(self):
        while (item := self.queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
