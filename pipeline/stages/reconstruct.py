"""Use a trained reconstructor: features -> images, and side-by-side PNGs for a store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.config import ReconstructorConfig
from pipeline.models import checkpoints
from pipeline.models.reconstructor import Reconstructor
from pipeline.science import metrics
from pipeline.stages.train import ENCODER_IDENTITY, encoder_identity
from storage import FeatureStore, StoreError, open_store


def load_reconstructor(checkpoint: Path, device: str | torch.device = "cpu") -> tuple[Reconstructor, dict]:
    """A checkpoint (its .json or .safetensors) -> the model in eval mode and the checkpoint header."""
    header = checkpoints.read_header(Path(checkpoint))
    geometry = header["model"]
    cfg = ReconstructorConfig.model_validate(
        {k: v for k, v in geometry.items() if k in ReconstructorConfig.model_fields}
    )
    model = Reconstructor(
        cfg, geometry["in_dim"], tuple(geometry["grid_hw"]), geometry["patch_size"], geometry["out_size"]
    )
    checkpoints.load_weights(header, model)
    return model.to(device).eval(), header


def check_checkpoint_matches_store(header: dict, store: FeatureStore) -> None:
    expected, got = header["encoder"], encoder_identity(store)
    diff = [k for k in ENCODER_IDENTITY if expected.get(k) != got[k]]
    if diff:
        details = "; ".join(f"{k}: checkpoint {expected.get(k)!r}, store {got[k]!r}" for k in diff)
        raise checkpoints.CheckpointError(
            f"checkpoint {header['_json_path']} was trained on features of encoder '{expected['name']}', "
            f"store {store.path.name} differs ({details})"
        )


class DisjointnessError(ValueError):
    """Images that trained or selected a reconstructor would be scored by it (an evaluation leak)."""


def images_that_shaped(header: dict) -> dict[str, np.ndarray]:
    """Image ids that trained the checkpoint's reconstructor and, for a best-on-val checkpoint, selected it."""
    roles = {"trained": header["train_store"]}
    if header.get("selected_on_store"):
        roles["selected"] = header["selected_on_store"]
    ids = {}
    for role, path in roles.items():
        try:
            store = open_store(path, require_complete=False)
        except StoreError as e:
            raise DisjointnessError(
                f"cannot check that the images are held out from checkpoint {header['_json_path']}: the store "
                f"that {role} it is unreadable ({e})"
            ) from None
        ids[role] = store.image_ids()[store.valid()]
    return ids


def check_held_out(image_ids: np.ndarray, header: dict, scored: str) -> None:
    """Refuse to score images that trained or selected the reconstructor (the paper's validity condition)."""
    for role, shaped in images_that_shaped(header).items():
        overlap = np.intersect1d(image_ids, shaped)
        if overlap.size:
            source = header["train_store"] if role == "trained" else header["selected_on_store"]
            fix = "score a split that R never saw (evaluate.split / operators.split)"
            if role == "selected":
                fix += ", or train with train.select_checkpoint: last"
            raise DisjointnessError(
                f"{scored}: {overlap.size} of its images {role} the reconstructor (store {Path(source).name}), "
                f"e.g. ids {overlap[:5].tolist()}; {fix}"
            )


@torch.no_grad()
def reconstruct(
    model: Reconstructor, features_nhwd: np.ndarray | torch.Tensor, preprocessing: dict
) -> np.ndarray:
    """Features [B, H, W, D] -> reconstructed RGB images, uint8 [B, S, S, 3]."""
    device = next(model.parameters()).device
    feats = torch.as_tensor(features_nhwd, device=device)
    images01 = metrics.denormalize(model(feats), preprocessing["mean"], preprocessing["std"])
    return (images01.permute(0, 2, 3, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)


def write_side_by_side(store_path: Path, checkpoint: Path, out_dir: Path, n_images: int = 8) -> list[Path]:
    """PNGs of original | reconstruction for the store's first n valid images."""
    store = open_store(store_path)
    model, header = load_reconstructor(checkpoint)
    check_checkpoint_matches_store(header, store)
    rows = np.flatnonzero(store.valid())[:n_images]
    recons = reconstruct(model, store.features(rows), store.attrs["encoder"]["preprocessing"])
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
