"""Judge encoders: pooled image embeddings that score how alike an original and its reconstruction look (cosine),
in grayscale (the released code's choice) or colour. Used by the evaluate and token utility stages."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pipeline.config import ConfigError, EncoderSpec
from pipeline.data import transforms
from pipeline.models import encoders


def load(
    specs: list[EncoderSpec], device: str, field: str = "evaluate.judges"
) -> dict[str, encoders.Encoder]:
    """The judge encoders (specs resolved by the plan), loaded on `device`."""
    judges = {}
    for spec in specs:
        if not spec.keep_head:
            raise ConfigError(
                f"{field}: '{spec.name}' must set keep_head: true (judges score pooled image embeddings)"
            )
        # Judges see the stored square image (the encoder's resolution and crop), resized (short_side_crop
        # of a square is a plain resize; a judge's own crop_pct margin would cut its border away).
        judges[spec.name] = encoders.load(spec, device=device, geometry="short_side_crop")
    return judges


def resize(images_nhwc: np.ndarray, size: int) -> np.ndarray:
    if images_nhwc.shape[1] == size:
        return images_nhwc
    return np.stack(
        [np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC)) for im in images_nhwc]
    )


def cosines(
    judge: encoders.Encoder, originals: np.ndarray, recons: np.ndarray, grayscale: bool
) -> np.ndarray:
    """Per image: cosine of the judge's embeddings of the original and the reconstruction (uint8 NHWC)."""

    def embed(images):
        # The released code judges grayscale copies (PIL convert("L"): the same BT.601 luma, rounded alike).
        images = transforms.grayscale(images) if grayscale else images
        batch = torch.stack([judge.preprocess(Image.fromarray(im)) for im in images])
        return torch.nn.functional.normalize(judge.embed(batch), dim=-1)

    return (embed(originals) * embed(recons)).sum(dim=-1).cpu().numpy()
