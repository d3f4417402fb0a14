"""An encoder's preprocessing, read from the model's own config, never re-typed: timm's resolved data config
or the Hugging Face image processor, scaled to the spec's resolution."""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.config import EncoderSpec
from pipeline.data.images import Preprocessing


def from_timm_config(spec: EncoderSpec, data_cfg: dict) -> Preprocessing:
    """From timm's `resolve_model_data_config` (interpolation, mean, std, crop_pct, crop_mode)."""
    crop_pct = data_cfg.get("crop_pct", 1.0)
    crop_mode = data_cfg.get("crop_mode", "center")
    if crop_mode not in ("center", "squash"):
        raise ValueError(f"encoder '{spec.name}': timm crop_mode '{crop_mode}' is not supported")
    return Preprocessing(
        resize_mode="shortest" if crop_mode == "center" else "squash",
        resize_size=int(np.floor(spec.resolution / crop_pct)),
        crop_size=spec.resolution,
        interpolation=data_cfg["interpolation"],
        mean=tuple(float(v) for v in data_cfg["mean"]),
        std=tuple(float(v) for v in data_cfg["std"]),
        source=f"timm pretrained_cfg of {spec.model_id} (crop_pct={crop_pct}, crop_mode={crop_mode}); "
        f"input size from spec resolution {spec.resolution}",
    )


def from_hf_processor(spec: EncoderSpec, processor) -> Preprocessing:
    """From a transformers image processor (size, crop, resample, mean, std), at the spec's resolution."""
    # transformers 5 keeps sizes in a SizeDict (iterates as its set fields), older versions in a dict or an int.
    size = {"shortest_edge": processor.size} if isinstance(processor.size, int) else dict(processor.size)
    do_crop = bool(getattr(processor, "do_center_crop", False))
    crop = dict(getattr(processor, "crop_size", None) or {})
    crop_side = crop.get("height", spec.resolution) if do_crop else None
    if "shortest_edge" in size:
        mode, resize_side = "shortest", size["shortest_edge"]
    else:
        mode, resize_side = "squash", size["height"]
    output_side = crop_side or resize_side
    # The spec's resolution wins (e.g. DINOv2 at 518); keep the processor's resize/crop ratio.
    resize_size = round(resize_side * spec.resolution / output_side)
    resample = getattr(processor, "resample", Image.Resampling.BICUBIC)
    interpolation = Image.Resampling(int(resample)).name.lower()
    return Preprocessing(
        resize_mode=mode,
        resize_size=resize_size,
        crop_size=spec.resolution,
        interpolation=interpolation,
        mean=tuple(float(v) for v in processor.image_mean),
        std=tuple(float(v) for v in processor.image_std),
        crop_offset="floor",  # transformers' center_crop: (side - crop) // 2, in its PIL and torchvision backends
        source=f"HF image processor {type(processor).__name__} of {spec.model_id} "
        f"(size={size}, crop={crop if do_crop else None}); scaled to spec resolution {spec.resolution}",
    )
