"""What a store holds: its shape, precision and codecs (`StoreLayout`, recorded in every store's attributes),
and the errors a store raises."""

from __future__ import annotations

from dataclasses import dataclass


class StoreError(RuntimeError):
    """A store that is missing, incomplete, or does not match what its reader expects."""


class StoreLocked(StoreError):
    """Another process is writing this store."""


@dataclass(frozen=True)
class StoreLayout:
    n_images: int
    grid_hw: tuple[int, int]
    hidden_dim: int
    pixel_size: int
    shard_images: int
    precision: str
    compressor: str
    store_pixels: bool = True
    compression_level: int = 3
    embedding_dim: int = 0  # > 0: an `embeddings` [N, E] array of pooled image embeddings
    # The pixels' own codec (`compressor: auto`); None in stores written before it: the features' codec.
    pixel_compressor: str | None = None
    pixel_compression_level: int | None = None
    # Bytes per blosc block of the features' codec; 0 (and stores written before it): blosc's own choice.
    compression_blocksize: int = 0

    @property
    def n_shards(self) -> int:
        return -(-self.n_images // self.shard_images)

    def estimated_bytes_per_image(self) -> float:
        """On-disk size of one image's rows, for the free-space check before encoding: features barely compress
        (~1.1x measured), bitround floats shrink to about half, pixels to about half."""
        h, w = self.grid_hw
        per_value = {"float32": 4.0, "float16": 2.0, "bf16_bitround": 2.0, "int8_per_token": 1.0}[
            self.precision
        ]
        features = h * w * (self.hidden_dim * per_value + (4 if self.precision == "int8_per_token" else 0))
        return features + (0.5 * self.pixel_size**2 * 3 if self.store_pixels else 0) + 4 * self.embedding_dim

    def shard_slice(self, shard: int) -> slice:
        return slice(shard * self.shard_images, min((shard + 1) * self.shard_images, self.n_images))
