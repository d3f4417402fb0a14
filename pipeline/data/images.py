"""Decode any image file to RGB uint8 or say why not; pixel-space transforms; resize/crop as an encoder does.

Decoding never raises on bad input: long runs skip the image and record the reason.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps

from pipeline.config import TransformSpec


class ImageSkipped(Exception):
    """An image that cannot be used; the message is the recorded reason."""


@contextlib.contextmanager
def _skipping_unusable(path: Path):
    """PIL's errors on an image file as the reasons it is skipped (ImageSkipped)."""
    if not path.is_file():
        raise ImageSkipped("not a file (a folder)" if path.is_dir() else "missing file")
    if path.stat().st_size == 0:
        raise ImageSkipped("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check decides (PIL's warning would fire at its fixed default instead);
            # PIL still refuses above twice its default (358 Mpx) with DecompressionBombError.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except ImageSkipped:
        raise
    except Image.DecompressionBombError as e:
        raise ImageSkipped(f"too large (decompression bomb guard): {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageSkipped("not an image (unidentified format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageSkipped(f"corrupt image: {e}") from None


def _open_checked(source, min_side: int, max_pixels: int, draft_to: int | None) -> Image.Image:
    """Open (headers only) and check the size; a JPEG is set to decode at the scale `draft_to` allows."""
    img = Image.open(source)
    width, height = img.size
    if width * height > max_pixels:
        raise ImageSkipped(f"too large: {width}x{height} > max_image_pixels {max_pixels}")
    if min(width, height) < min_side:
        raise ImageSkipped(f"too small: {width}x{height}, min_image_side is {min_side}")
    if draft_to and img.format == "JPEG":
        # JPEG can decode at 1/2, 1/4, 1/8 scale: huge photos never materialise at full size.
        img.draft("RGB", (draft_to, draft_to))
    return img


def load_rgb(path: Path, *, min_side: int, max_pixels: int, draft_to: int | None = None) -> Image.Image:
    """Open `path` as an 8-bit RGB PIL image, converting grayscale/CMYK/palette/alpha/16-bit; raise ImageSkipped."""
    with _skipping_unusable(path):
        img = _open_checked(path, min_side, max_pixels, draft_to)
        img.load()
        img = ImageOps.exif_transpose(img)
    return _to_rgb(img)


def load_rgb_array(path: Path, *, min_side: int, max_pixels: int, draft_to: int | None = None) -> np.ndarray:
    """load_rgb as uint8 [H, W, 3]. A colour JPEG with no EXIF rotation (nearly every photo) is decoded by
    simplejpeg at the scale PIL's draft chose: the same libjpeg-turbo decode, so the same pixels (tested), without
    PIL's decoder overhead and the copy into NumPy (docs/benchmarks.md). Everything else goes through PIL."""
    with _skipping_unusable(path):
        img = _open_checked(path, min_side, max_pixels, draft_to)
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        if img.format == "JPEG" and img.mode == "RGB" and orientation == 1:
            pixels = _decoded_as_pil_would(path.read_bytes(), *img.size)
            if pixels is not None:
                img.close()
                return pixels
        img.load()
        img = ImageOps.exif_transpose(img)
    return np.asarray(_to_rgb(img))


# libjpeg warnings that mean lost image data (it fills the rest grey) rather than harmless extra bytes; PIL
# decodes such files without a word. (A file cut short PIL refuses itself, saying "truncated".)
_LOST_DATA = ("premature end of data segment", "bad huffman code")


def _decoded_as_pil_would(jpeg: bytes, width: int, height: int) -> np.ndarray | None:
    """simplejpeg's decode at PIL's draft size: libjpeg-turbo's smallest scale that keeps it is PIL's. None where
    simplejpeg refuses what libjpeg only warns of (PIL then decides) or lands on another size; a file whose image
    data is damaged is skipped."""
    try:
        pixels = simplejpeg.decode_jpeg(jpeg, "RGB", min_width=width, min_height=height)
    except ValueError as e:
        if any(warning in str(e).lower() for warning in _LOST_DATA):
            raise ImageSkipped(f"corrupt image: {e}") from None
        return None
    return pixels if pixels.shape[:2] == (height, width) else None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / 32-bit grayscale: PIL's convert("RGB") clips at 255; rescale the real range to 8 bits instead.
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr8 = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent areas become white, as a viewer would show them, not their arbitrary hidden RGB.
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def apply_transform(pixels_hwc: np.ndarray, transform: TransformSpec) -> np.ndarray:
    """Apply a registered pixel-space transform T to an RGB uint8 image."""
    from pipeline.data.transforms import REGISTRY

    return REGISTRY[transform.name].fn(pixels_hwc, **transform.params)


_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@dataclass(frozen=True)
class Preprocessing:
    """An encoder's eval preprocessing, read from the model's own config and recorded in every store.

    resize_mode 'shortest': shortest side -> resize_size (aspect kept), then a centre crop of crop_size;
    resize_mode 'squash': both sides -> resize_size (aspect lost), then a centre crop of crop_size.
    geometry 'native' is the model's own eval transform; 'short_side_crop' keeps its interpolation, mean and std
    but resizes the short side straight to crop_size, so every encoder sees the same field of view.
    crop_offset: how an odd margin is split, 'round' as torchvision's CenterCrop (timm's eval transform, and
    short_side_crop for every encoder) or 'floor' as transformers' image processors (native geometry only).
    """

    resize_mode: str
    resize_size: int
    crop_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str
    geometry: str = "native"
    crop_offset: str = "round"

    def to_dict(self) -> dict:
        record = asdict(self)
        if record["crop_offset"] == "round":  # absent, as in the records made before it was a field
            del record["crop_offset"]
        return record

    @classmethod
    def from_dict(cls, record: dict) -> Preprocessing:
        """Rebuild from a store's or checkpoint's record (lists back to tuples)."""
        return cls(**{**record, "mean": tuple(record["mean"]), "std": tuple(record["std"])})

    def normalize(self, pixels_nhwc_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 [B, S, S, 3] -> encoder-normalised float32 [B, 3, S, S] (the encoder's input, the training target)."""
        x = pixels_nhwc_uint8.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self._per_channel(self.mean, x)) / self._per_channel(self.std, x)

    def denormalize(self, images_nchw: torch.Tensor) -> torch.Tensor:
        """Encoder-normalised images -> [0, 1] RGB (clamped), float32 [B, 3, S, S]."""
        x = images_nchw.float()
        return (x * self._per_channel(self.std, x) + self._per_channel(self.mean, x)).clamp_(0, 1)

    def to_uint8_nhwc(self, images_nchw: torch.Tensor) -> np.ndarray:
        """Encoder-normalised images -> RGB uint8 [B, S, S, 3] (rounded)."""
        return (self.denormalize(images_nchw).permute(0, 2, 3, 1).cpu().numpy() * 255.0 + 0.5).astype(
            np.uint8
        )

    @staticmethod
    def _per_channel(values: tuple[float, float, float], like: torch.Tensor) -> torch.Tensor:
        return _per_channel_constant(tuple(values), like.device)

    def with_geometry(self, geometry: str) -> Preprocessing:
        if geometry == "native":
            return replace(self, geometry="native")
        if geometry != "short_side_crop":
            raise ValueError(f"unknown geometry '{geometry}'; known: short_side_crop, native")
        return replace(
            self, geometry=geometry, resize_mode="shortest", resize_size=self.crop_size, crop_offset="round"
        )

    def to_pixels(self, img: Image.Image | np.ndarray, resize: str = "pil") -> np.ndarray:
        """Resize + crop an RGB image to the encoder's input: uint8 [S, S, 3]. Normalisation happens on device.

        resize 'pil': PIL's resampling, what timm's and transformers' eval transforms do. 'torch': torch's
        antialiased uint8 resize, the same filters (torchvision's tensor transforms and transformers' fast image
        processors use it) at ~5x the speed; it gives values within 2 levels of PIL's (0.4 % of values differ on
        a photo, a few in a million by 2 when upsampling; docs/benchmarks.md). Only bilinear and bicubic have it;
        other filters always use PIL."""
        h, w = img.shape[:2] if isinstance(img, np.ndarray) else img.size[::-1]
        if self.resize_mode == "squash":
            new_w = new_h = self.resize_size
        else:
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.resize_size, int(self.resize_size * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        s = self.crop_size
        if self.crop_offset == "floor":
            top, left = (new_h - s) // 2, (new_w - s) // 2
        else:
            top, left = int(round((new_h - s) / 2.0)), int(round((new_w - s) / 2.0))
        if resize == "torch" and self.interpolation in ("bilinear", "bicubic") and (new_w, new_h) != (w, h):
            # HWC uint8 viewed as NCHW is channels-last: the layout torch's vectorised uint8 kernel takes
            image = torch.from_numpy(np.require(img, np.uint8, ["C", "W"])).permute(2, 0, 1)[None]
            resized = F.interpolate(image, size=(new_h, new_w), mode=self.interpolation, antialias=True)
            return resized[0, :, top : top + s, left : left + s].permute(1, 2, 0).numpy().copy()
        if isinstance(img, np.ndarray):
            img = Image.fromarray(img)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), resample=_RESAMPLE[self.interpolation])
        if (new_w, new_h) != (s, s):
            img = img.crop((left, top, left + s, top + s))
        return np.array(img, dtype=np.uint8)  # a writable copy (torch.from_numpy warns on read-only arrays)


def draft_side(preprocessing: Preprocessing, jpeg_draft: str) -> int:
    """The smallest side a JPEG may decode at (encode.jpeg_draft). 2x: twice the crop side; 1x: the side the
    resize targets (never below it: the resize never upsamples what a full decode would not)."""
    return {
        "2x": max(2 * preprocessing.crop_size, preprocessing.resize_size),
        "1x": preprocessing.resize_size,
    }[jpeg_draft]


def decode_for_encoder(
    path: Path,
    preprocessing: Preprocessing,
    transform: TransformSpec,
    min_side: int,
    max_pixels: int,
    resize: str = "pil",
    jpeg_draft: str = "2x",
) -> tuple[np.ndarray, str]:
    """An image file as the encoder sees it (uint8 [S, S, 3], T applied), or zeros and the reason it was skipped."""
    s = preprocessing.crop_size
    try:
        pixels = load_rgb_array(
            path, min_side=min_side, max_pixels=max_pixels, draft_to=draft_side(preprocessing, jpeg_draft)
        )
        if transform.name != "identity":
            pixels = apply_transform(pixels, transform)
        return preprocessing.to_pixels(pixels, resize), ""
    except ImageSkipped as e:
        return np.zeros((s, s, 3), np.uint8), str(e)
    except Exception as e:  # a decoder bug on one odd file must not end a long run
        return np.zeros((s, s, 3), np.uint8), f"unreadable: {type(e).__name__}: {e}"


@functools.lru_cache(maxsize=64)
def _per_channel_constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """Made once per device: a tensor built from Python numbers on a GPU is a blocking copy that waits for all
    the work queued before it, which would stall the encode stage's pipelined batches and each training step.
    Outside inference mode, so that training may use the tensor an encode made first."""
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1).to(device)
