"""Judge encoders: pooled image embeddings that score how alike an original and its reconstruction look (cosine),
in grayscale (the released code's choice) or colour. Used by the evaluate and token utility stages."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pipeline.config import ConfigError, EncoderSpec
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
        # of a square is a plain resize; a judge's own crop_pct margin would cut its border away). In float32
        # on every device, as the released code: bf16 autocast would add noise to every score, unkeyed.
        judges[spec.name] = encoders.load(
            spec, device=device, compute_dtype="float32", geometry="short_side_crop"
        )
    return judges


def resize(images_nhwc: np.ndarray, size: int) -> np.ndarray:
    if images_nhwc.shape[1] == size:
        return images_nhwc
    return np.stack(
        [np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC)) for im in images_nhwc]
    )


def released_judge_input(images_nhwc: np.ndarray, size: int) -> np.ndarray:
    """What the released evaluation hands its judges' processors: the image resized to `size` by bilinear
    interpolation without antialiasing (F.interpolate, align_corners=False), then truncated to uint8."""
    x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(
        x, size=(size, size), mode="bilinear", align_corners=False, antialias=False
    )
    return (x.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def cosines(
    judge: encoders.Encoder,
    originals: np.ndarray,
    recons: np.ndarray,
    grayscale: bool,
    input_resolution: int | None,
) -> np.ndarray:
    """Per image: cosine of the judge's embeddings of the original and the reconstruction (uint8 NHWC).

    input_resolution: both images first go through released_judge_input at that size (the released code: 224);
    None: the judge's processor gets them at the encoder's resolution."""

    def embed(images):
        if input_resolution is not None:
            images = released_judge_input(images, input_resolution)
        # PIL's integer BT.601 luma, as the released code's convert("L").convert("RGB")
        pil = [
            Image.fromarray(im).convert("L").convert("RGB") if grayscale else Image.fromarray(im)
            for im in images
        ]
        batch = torch.stack([judge.preprocess(im) for im in pil])
        return torch.nn.functional.normalize(judge.embed(batch), dim=-1)

    return (embed(originals) * embed(recons)).sum(dim=-1).cpu().numpy()
