"""The encode stage's decode workers: DataLoader processes that decode, transform, resize and crop images.

They fork from a clean fork server, never from the stage's process, and they never import the program that
started the stage (see `started`).
"""

from __future__ import annotations

import functools
import multiprocessing
import signal
import sys
import threading
import types
from collections.abc import Iterator

import numpy as np
import torch

from pipeline import cpus
from pipeline.config import EncodeOptions, TransformSpec
from pipeline.data.datasets import ImageRecord
from pipeline.data.images import Preprocessing, decode_for_encoder


class DecodeDataset(torch.utils.data.Dataset):
    """Runs in DataLoader workers: decode, transform, resize + crop to uint8. Never raises on a bad image."""

    def __init__(
        self,
        records: list[ImageRecord],
        preprocessing: Preprocessing,
        transform: TransformSpec,
        options: EncodeOptions,
    ):
        self.records = records
        self.preprocessing = preprocessing
        self.transform = transform
        self.options = options

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, pos: int):
        record = self.records[pos]
        if record.refused:
            s = self.preprocessing.crop_size
            return pos, np.zeros((s, s, 3), np.uint8), f"refused: {record.refused}"
        pixels, reason = decode_for_encoder(
            record.path, self.preprocessing, self.transform, self.options.min_image_side,
            self.options.max_image_pixels, self.options.resize, self.options.jpeg_draft,
        )  # fmt: skip
        return pos, pixels, reason


def collate(items):
    positions, pixels, reasons = zip(*items, strict=True)
    return torch.tensor(positions), torch.from_numpy(np.stack(pixels)), list(reasons)


def loader(
    dataset: DecodeDataset, batches: list[list[int]], *, num_workers: int, pin_memory: bool
) -> torch.utils.data.DataLoader:
    """`batches` (lists of positions in `dataset`) as (positions, uint8 pixels NHWC, failure reasons), decoded
    by `num_workers` worker processes (none: in this process)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,
        multiprocessing_context=_worker_context() if num_workers else None,
        worker_init_fn=functools.partial(_start_worker, cpus.START),
    )


def started(decode_loader: torch.utils.data.DataLoader) -> Iterator:
    """The loader's batches, its workers started.

    A worker started by a fork server or by spawn first imports the parent's `__main__` (CPython runs it again
    as `__mp_main__`), and the parent waits for each one in turn whenever the pickled dataset is larger than a
    pipe's buffer (64 KiB, about a thousand image records). Under a served Prefect run `__main__` is `prefect.engine`
    (1.3 s to import here) and a benchmark script imports more: on an H200 machine 12 workers took 7.6 s to
    start, 0.6 s each, and each kept a copy of those modules. The workers need nothing from `__main__` (their
    code is this module, which the fork server preloads), so it is hidden from them while they start. CPython's
    own way, preloading `__main__` in the fork server, does not work up to 3.13 (its fork server looks for a
    `main_path` key that the preparation data names `init_main_from_path`)."""
    if not decode_loader.num_workers:
        return iter(decode_loader)
    # two stages starting their workers at once on two threads must not swap in each other's stub
    with _main_swap:
        main = sys.modules["__main__"]
        # no __file__ or __spec__: nothing for the workers to import
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            return iter(decode_loader)
        finally:
            sys.modules["__main__"] = main


_main_swap = threading.Lock()


def _worker_context():
    """DataLoader workers are not forks of this (possibly multi-threaded) process: forked from inside a Prefect
    flow (its threads, event loop and exit hooks) they died with exit code 1. They fork from a clean fork server
    that has already imported this module, so a worker starts in milliseconds, not seconds."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _start_worker(start_cpus: frozenset[int], worker_id: int) -> None:
    # Ctrl-C reaches the terminal's whole process group: the stage stops its workers itself (pipeline/stop.py)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cpus.run_on(start_cpus, worker_id)
