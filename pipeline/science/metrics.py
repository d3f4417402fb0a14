"""Pixel-space image metrics on [0, 1] RGB images; SSIM from scikit-image."""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import structural_similarity


def denormalize(images_nchw: torch.Tensor, mean, std) -> torch.Tensor:
    """Encoder-normalised images -> [0, 1] RGB (clamped), float32 [B, 3, S, S]."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=images_nchw.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images_nchw.device).view(1, 3, 1, 1)
    return (images_nchw.float() * s + m).clamp_(0, 1)


def normalize_pixels(pixels_nhwc_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> encoder-normalised float32 [B, 3, S, S] (the reconstruction target)."""
    x = pixels_nhwc_uint8.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def psnr_db(reference_01: np.ndarray, test_01: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB for [N, ...] arrays in [0, 1]."""
    axes = tuple(range(1, reference_01.ndim))
    mse = np.mean((reference_01.astype(np.float64) - test_01.astype(np.float64)) ** 2, axis=axes)
    return 10.0 * np.log10(1.0 / np.maximum(mse, 1e-12))


def ssim(reference_nhwc_01: np.ndarray, test_nhwc_01: np.ndarray) -> np.ndarray:
    """Per-image SSIM (scikit-image, Gaussian-free default window, data range 1)."""
    return np.array(
        [
            structural_similarity(r, t, channel_axis=-1, data_range=1.0)
            for r, t in zip(
                reference_nhwc_01.astype(np.float64), test_nhwc_01.astype(np.float64), strict=True
            )
        ]
    )
