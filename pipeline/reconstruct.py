"""Use a trained reconstructor: features -> images, and side-by-side PNGs for a store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline import checkpoints, metrics
from pipeline.config import ReconstructorConfig
from pipeline.reconstructor import Reconstructor
from pipeline.train import ENCODER_IDENTITY, encoder_identity
from storage import FeatureStore, open_store


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
    diff = [k for k in ENCODER_IDENTITY if expected[k] != got[k]]
    if diff:
        details = "; ".join(f"{k}: checkpoint {expected[k]!r}, store {got[k]!r}" for k in diff)
        raise checkpoints.CheckpointError(
            f"checkpoint {header['_json_path']} was trained on features of encoder '{expected['name']}', "
            f"store {store.path.name} differs ({details})"
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
