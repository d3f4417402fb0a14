"""The encode stage's decode workers: DataLoader processes that decode, transform, resize and crop images.

They start as pipeline/data/worker_processes.py starts every DataLoader worker (`worker_processes.started`).
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.config import EncodeOptions, TransformSpec
from pipeline.data import worker_processes
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
        multiprocessing_context=worker_processes.context() if num_workers else None,
        worker_init_fn=worker_processes.init(),
    )
