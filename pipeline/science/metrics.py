"""Pixel-space image metrics on [0, 1] RGB images; SSIM from scikit-image. (Normalisation to and from an
encoder's input space belongs to its preprocessing: pipeline/data/images.Preprocessing.)"""

from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity


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
