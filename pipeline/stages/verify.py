"""`store verify --recompute N`: re-encode random images of a finished store with the encoder, weights, layer,
geometry and transform it records, and check the stored features against the fresh ones within the error its
precision allows. Catches stores whose record does not describe their content (another crop, another model);
first, every shard file is checked against the SHA-256 recorded when it was written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.artifacts import WriteLock
from pipeline.config import DatasetSpec, EncoderSpec, SubsetSpec, TransformSpec
from pipeline.data.datasets import image_list_sha256, list_images
from pipeline.data.images import decode_for_encoder
from pipeline.data.store_info import StoreInfo
from pipeline.models import encoders
from storage import StoreError, open_store
from storage.format import damaged_message, decoding
from storage.precision import MAX_TOKEN_RELATIVE_ERROR

# Recomputing is not bit-exact (batch composition changes BLAS paths; bf16 autocast rounds activations): the
# tolerance of the forward pass itself, relative to each token's largest |value|, added to the storage bound.
COMPUTE_TOLERANCE = {"float32": 1e-3, "bfloat16": 3e-2}


@dataclass(frozen=True)
class ImageCheck:
    image_id: int
    path: str
    pixel_max_abs_diff: int  # stored vs freshly decoded uint8 pixels (-1: the store keeps no pixels)
    feature_error: float  # max over tokens of max|stored − fresh| / max|fresh|
    ok: bool


@dataclass(frozen=True)
class VerifyReport:
    store: Path
    bound: float
    checks: list[ImageCheck]
    notes: list[str]

    @property
    def mismatches(self) -> list[ImageCheck]:
        return [c for c in self.checks if not c.ok]

    @property
    def largest_error(self) -> float:
        return max(c.feature_error for c in self.checks)


def token_relative_error(stored_nhwd: np.ndarray, fresh_nhwd: np.ndarray) -> np.ndarray:
    """Per image: the largest |stored − fresh| of any token divided by that token's largest |fresh| value."""
    scale = np.maximum(np.abs(fresh_nhwd).max(axis=-1), 1e-12)
    return (np.abs(stored_nhwd - fresh_nhwd).max(axis=-1) / scale).reshape(len(fresh_nhwd), -1).max(axis=1)


def repair(path: Path) -> dict[int, str]:
    """Check every shard file of a store against its SHA-256 and take the damaged shards back (the store becomes
    partial), so the next encode run re-encodes exactly those; the damaged shards and their problems."""
    store = open_store(path, require_complete=False, mode="r+")
    with WriteLock(store.path, wait_s=0):  # not while a run writes or reads it
        if damaged := store.damaged_shards(full=True):
            store.reopen_shards(sorted(damaged))
    return damaged


def verify(
    path: Path, n_images: int, seed: int = 0, device: str = "auto", batch_size: int = 16
) -> VerifyReport:
    # every damaged shard at once, not only the first one its size gives away
    store = open_store(path, require_complete=False)
    if damaged := store.damaged_shards(full=True):  # every byte against its shard's SHA-256 first
        raise StoreError(damaged_message(store, damaged))
    store = open_store(path)  # and complete
    info = StoreInfo.of(store)
    key = info.key
    if info.dataset_source is None:
        raise StoreError(f"{path}: the store does not record where its images came from (made before format "
                         "attribute 'dataset_source'); re-encode it to verify")  # fmt: skip
    spec = EncoderSpec.model_validate({**key["encoder"], "name": info.encoder_name})
    dataset = DatasetSpec.model_validate(info.dataset_source)
    records = list_images(dataset, key["dataset"]["split"], SubsetSpec.model_validate(key["subset"]))
    if image_list_sha256(records) != key["image_list_sha256"]:
        raise StoreError(f"{path}: the images under {dataset.root} are no longer the ones this store encoded "
                         "(image list digest differs)")  # fmt: skip
    geometry = key.get("geometry", "native")
    encoder = encoders.load(spec, device=device, compute_dtype=key["compute_dtype"], geometry=geometry)
    notes = []
    recorded_weights = info.encoder_identity["weights_id"]
    if encoder.weights_id != recorded_weights:
        raise StoreError(f"{path}: recorded weights {recorded_weights}, available now "
                         f"{encoder.weights_id}; cannot recompute with the recorded encoder")  # fmt: skip
    if encoder.preprocessing != info.preprocessing:
        notes.append("the recorded encoder's preprocessing today differs from the store's record")
    valid_rows = np.flatnonzero(store.valid())
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(valid_rows, size=min(n_images, valid_rows.size), replace=False))
    transform = TransformSpec.model_validate(key["image_transform"])
    limits, options = key["image_limits"], decoding(key)
    bound = MAX_TOKEN_RELATIVE_ERROR[store.layout.precision] + COMPUTE_TOLERANCE[key["compute_dtype"]]
    image_ids = store.image_ids()
    checks = []
    for start in range(0, rows.size, batch_size):
        batch = rows[start : start + batch_size]
        decoded = [decode_for_encoder(records[r].path, encoder.preprocessing, transform, limits["min_side"],
                                      limits["max_pixels"], options["resize"], options["jpeg_draft"])
                   for r in batch]  # fmt: skip
        failed = [records[r].path for r, (_, reason) in zip(batch, decoded, strict=True) if reason]
        if failed:
            raise StoreError(f"{path}: image(s) encoded before can no longer be read: {failed[:3]}")
        pixels = np.stack([p for p, _ in decoded])
        fresh = encoder.encode(encoder.normalize(encoder.seen(torch.from_numpy(pixels)))).cpu().numpy()
        errors = token_relative_error(store.features(batch), fresh)
        pixel_diffs = (
            np.abs(store.pixels(batch).astype(int) - pixels).reshape(len(batch), -1).max(axis=1)
            if store.layout.store_pixels
            else np.full(len(batch), -1)
        )
        for r, err, pdiff in zip(batch, errors, pixel_diffs, strict=True):
            checks.append(ImageCheck(int(image_ids[r]), str(records[r].path), int(pdiff), float(err),
                                     bool(err <= bound and pdiff <= 0)))  # fmt: skip
    return VerifyReport(Path(path), bound, checks, notes)
