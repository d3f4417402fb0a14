"""How features are stored on disk: dtype, value filters and byte codecs, and the way back to float32.

Measured on ViT activations, lossless codecs shrink float16 features by only ~9%: the savings come from
precision control (docs/benchmarks.md).
"""

from __future__ import annotations

import warnings

import numpy as np
import zarr.codecs as zc

FLOAT16_MAX = float(np.finfo(np.float16).max)

# Largest error storage adds to a feature value, relative to the largest |value| of its token (the unit round-off
# of the stored mantissa; int8_per_token: half a step of scale = max|token| / 127). `store verify` checks it.
MAX_TOKEN_RELATIVE_ERROR = {
    "float32": 0.0,
    "float16": 2.0**-11,
    "bf16_bitround": 2.0**-8,
    "int8_per_token": 0.5 / 127,
}


def default_level(precision: str) -> int:
    """A named compressor's level where the config gives none (in blosc's own blocks, where level 7 takes
    bf16-rounded features from 0.71x to 0.65x the bytes of a bf16 .pt, and level 3 is within 2% of level 7
    elsewhere: docs/benchmarks.md)."""
    return 7 if precision == "bf16_bitround" else 3


# `compressor: auto`: (codec, level, blosc block bytes) per precision for features, measured on ViT-B activations
# and photos (docs/benchmarks.md, "Codecs per array"). zstd only where it saves more than ~10 % of the bytes:
# float16/float32 features gain only 1.10x from it, at 10-15x the decode time of lz4, which alone lets a 512 px
# image read in under 1 ms and still shrinks zero runs (ReLU'd CNN features); int8 codes gain 8 % on real
# activations (0.458 vs 0.500 of the float16 bytes at 512 px) for ~1 ms to decode a 512 px image, 30x lz4's.
# zstd stays for bf16-rounded features, where it is the point (0.63 vs 0.80 of the float16 bytes: their zeroed
# bits), at level 1 in 1 MiB blocks: blosc's own block choice (32-256 KiB) cuts the long zero byte planes that
# shuffle makes into pieces (level 7 in those blocks is no smaller at 512 px). Against level 7 in blosc's blocks, on
# bf16-rounded ViT-B-like random values at 512 px: 0.71x vs 0.73x the float16 bytes (real activations: 0.63x
# both), 5 vs 53-78 ms to compress an image, 1.0-1.3 vs 1.6-2.1 ms to decompress it. Pixels: lz4 too (1.09-1.14x
# vs zstd's 1.21-1.38x, a few % of a store's bytes; zstd costs 0.6 ms per 224 px image to write and 1.4 ms per
# 512 px image to read).
ZSTD_BLOCK_BYTES = 1 << 20
AUTO_FEATURE_CODECS = {
    "float16": ("blosc_lz4", 5, 0),
    "float32": ("blosc_lz4", 5, 0),
    "bf16_bitround": ("blosc_zstd_shuffle", 1, ZSTD_BLOCK_BYTES),
    "int8_per_token": ("blosc_lz4", 5, 0),
}
AUTO_PIXEL_CODEC = ("blosc_lz4", 5)


def resolve_codecs(precision: str, compressor: str, level: int | None) -> dict:
    """The codec, level and blosc block size of features (and the small per-image arrays) and the codec of
    pixels, as the store layout records them. A named compressor applies to every array, in blosc's own blocks
    (stores made before `auto` did this)."""
    if compressor != "auto":
        chosen = (compressor, level or default_level(precision))
        return _as_layout(chosen, chosen, 0)
    codec, auto_level, block_bytes = AUTO_FEATURE_CODECS[precision]
    return _as_layout((codec, level or auto_level), AUTO_PIXEL_CODEC, block_bytes)


def _as_layout(features: tuple[str, int], pixels: tuple[str, int], block_bytes: int) -> dict:
    return {
        "compressor": features[0],
        "compression_level": features[1],
        "compression_blocksize": block_bytes,
        "pixel_compressor": pixels[0],
        "pixel_compression_level": pixels[1],
    }


def compressors(name: str, level: int = 3, block_bytes: int = 0) -> list:
    """The Zarr v3 codec `name` at `level`; `block_bytes` is blosc's block size (0: blosc chooses)."""
    if name == "none":
        return []
    if name == "zstd":
        return [zc.ZstdCodec(level=level)]
    if name == "blosc_lz4":
        return [zc.BloscCodec(cname="lz4", clevel=level, shuffle="shuffle", blocksize=block_bytes)]
    shuffle = "bitshuffle" if name == "blosc_zstd_bitshuffle" else "shuffle"
    return [zc.BloscCodec(cname="zstd", clevel=level, shuffle=shuffle, blocksize=block_bytes)]


def feature_dtype_and_filters(precision: str) -> tuple[str, list]:
    if precision == "float16":
        return "float16", []
    if precision == "float32":
        return "float32", []
    if precision == "bf16_bitround":
        # float32 container, mantissa rounded to bfloat16's 7 bits before writing (`round_to_bf16`): relative
        # error <= 2^-8 like bf16 itself, no float16 overflow or subnormal loss, and the 16 zeroed bits cost almost
        # nothing after shuffle + zstd. No filter in the chain: any Zarr v3 reader decodes it.
        return "float32", []
    if precision == "int8_per_token":
        return "int8", []
    raise ValueError(f"unknown precision {precision}")


def quantize(features_nhwd: np.ndarray, precision: str) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 features -> (array to store, per-token scale or None)."""
    if precision == "int8_per_token":
        scale = np.abs(features_nhwd).max(axis=-1) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        codes = np.clip(np.rint(features_nhwd / scale[..., None]), -127, 127).astype(np.int8)
        return codes, scale
    if precision == "bf16_bitround":
        return round_to_bf16(features_nhwd), None
    dtype, _ = feature_dtype_and_filters(precision)
    return features_nhwd.astype(dtype, copy=False), None


def round_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 with the mantissa rounded to bfloat16's 7 bits (round half to even; the same bits as numcodecs'
    BitRound(keepbits=7), which earlier stores carried as a non-standard filter). NaN and inf stay as they are."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) & np.uint32(0xFFFF0000)
    return np.where(np.isfinite(values), rounded.view(np.float32), values.astype(np.float32))


def dequantize(stored: np.ndarray, scale: np.ndarray | None, out: np.ndarray | None = None) -> np.ndarray:
    """Stored values as float32 (into `out` where given): float16 widened, int8 codes times their token's scale.
    The same values as NumPy's `astype` and `multiply` (exact conversions, then one float32 product; a signalling
    NaN comes back quiet), in torch's vectorised kernels: NumPy widens float16 without SIMD here, 1.5 ms for one
    ViT-B@512 image against torch's 0.24 ms (docs/benchmarks.md, reads run 6)."""
    if out is None:
        if scale is None and stored.dtype == np.float32:
            return stored
        out = np.empty(stored.shape, np.float32)
    import torch  # here, not at the top: reading a store's metadata needs no torch

    target = torch.from_numpy(out)
    with warnings.catch_warnings():  # a read-only input is only read
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        target.copy_(torch.from_numpy(stored))
        if scale is not None:
            target.mul_(torch.from_numpy(scale)[..., None])
    return out


def value_stats(features_nhwd: np.ndarray) -> dict:
    """Numbers recorded per shard: does float16 overflow, are there non-finite values."""
    finite = np.isfinite(features_nhwd)
    abs_finite = np.abs(np.where(finite, features_nhwd, 0.0))
    return {
        "max_abs": float(abs_finite.max()) if abs_finite.size else 0.0,
        "n_nonfinite": int((~finite).sum()),
        "n_over_float16_max": int((abs_finite > FLOAT16_MAX).sum()),
        "sum_token_norm": float(np.linalg.norm(np.where(finite, features_nhwd, 0.0), axis=-1).sum()),
        "n_tokens": int(np.prod(features_nhwd.shape[:-1])),
    }
