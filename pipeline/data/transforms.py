"""Pixel-space image transforms T for feature-operator studies, as a registry of named, parameterised functions.

Add one with `@register("name", params=("p",))` on a function (pixels_hwc_uint8, **params) -> pixels_hwc_uint8;
a TransformSpec then accepts `name: name` with those params, and the encode stage applies it before preprocessing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Transform:
    fn: Callable[..., np.ndarray]
    params: tuple[str, ...]
    description: str
    involutive: bool  # T∘T = id: the only transforms an involution fit is meaningful for


REGISTRY: dict[str, Transform] = {}


def register(name: str, params: tuple[str, ...] = (), involutive: bool = False):
    def wrap(fn):
        REGISTRY[name] = Transform(fn, params, (fn.__doc__ or "").strip(), involutive)
        return fn

    return wrap


@register("identity", involutive=True)
def identity(pixels: np.ndarray) -> np.ndarray:
    """No change."""
    return pixels


@register("swap_rb", involutive=True)
def swap_rb(pixels: np.ndarray) -> np.ndarray:
    """Swap the red and blue channels (an involution)."""
    return np.ascontiguousarray(pixels[..., ::-1])


@register("scale_channel", params=("channel", "alpha"))
def scale_channel(pixels: np.ndarray, channel: str, alpha: float) -> np.ndarray:
    """Multiply one channel (r, g or b) by alpha, rounding and clipping to [0, 255]."""
    out = pixels.copy()
    c = "rgb".index(channel)
    out[..., c] = np.clip(np.round(pixels[..., c] * alpha), 0, 255).astype(np.uint8)
    return out


@register("grayscale")
def grayscale(pixels: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma replicated to three channels (colorization pairs go gray -> colour)."""
    luma = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    gray = np.clip(np.round(luma), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def expected_spectrum(name: str, params: dict, direction: str) -> str | None:
    """The paper's prediction for the operator of (T, direction), a key of operator_fits.PREDICTIONS, or None."""
    if REGISTRY[name].involutive:
        return "involution"
    if name == "scale_channel" and direction == "forward" and params["alpha"] <= 1:
        return "contraction"
    return None


@register("resample", params=("factor",))
def resample(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Shrink by `factor` (box filter), then enlarge back to the same size (bilinear): the detail finer than
    `factor` pixels is gone, by construction."""
    from PIL import Image

    h, w = pixels.shape[:2]
    small = Image.fromarray(pixels).resize((max(1, w // factor), max(1, h // factor)), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.BILINEAR))
