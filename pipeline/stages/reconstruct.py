"""The reconstruct command: side-by-side PNGs (original | reconstruction) of a store through a trained reconstructor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.artifacts import reading
from pipeline.data.store_info import StoreInfo
from pipeline.models.checkpoints import (
    check_checkpoint_matches_store,
    load_reconstructor,
    reconstruct,
    training_run_of,
)
from storage import open_store


def write_side_by_side(store_path: Path, checkpoint: Path, out_dir: Path, n_images: int = 8) -> list[Path]:
    """PNGs of original | reconstruction for the store's first n valid images; `checkpoint`: a checkpoint's .json
    or a training run's folder (its chosen checkpoint)."""
    run_dir = checkpoint if Path(checkpoint).is_dir() else training_run_of(checkpoint)
    with reading(store_path, run_dir):
        return _write(store_path, checkpoint, out_dir, n_images)


def _write(store_path: Path, checkpoint: Path, out_dir: Path, n_images: int) -> list[Path]:
    store = open_store(store_path)
    model, header = load_reconstructor(checkpoint)
    check_checkpoint_matches_store(header, store)
    rows = np.flatnonzero(store.valid())[:n_images]
    recons = reconstruct(model, store.features(rows), StoreInfo.of(store).preprocessing)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_ids = store.image_ids()
    paths = []
    for row, recon in zip(rows, recons, strict=True):
        pair = np.concatenate([store.pixels(int(row)), recon], axis=1)
        path = out_dir / f"{int(image_ids[row])}.png"
        Image.fromarray(pair).save(path)
        paths.append(path)
    return paths
