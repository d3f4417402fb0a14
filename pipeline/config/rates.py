"""The rates the cost model reads (configs/rates.yaml): a GPU's peak and utilisation, the host's measured
per-image CPU costs, measured stored bytes, and FLOP twins for models timm cannot build offline."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from pipeline.config.base import Frozen

Stage = Literal["encode", "train", "train_compiled", "evaluate"]  # train_compiled: train.compile: true
Precisions = dict[Literal["float16", "float32", "bf16_bitround", "int8_per_token"], float]


class GpuRates(Frozen):
    name: str
    peak_tflops: float = Field(gt=0, description="Dense peak of the compute dtype (bf16 autocast on CUDA).")
    peak_source: str
    utilisation: dict[Stage, Annotated[float, Field(gt=0, le=1)]] = Field(
        description="Share of the peak each stage reaches, 0-1."
    )
    utilisation_source: str
    utilisation_by_step_tflop: dict[
        Stage, dict[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0, le=1)]]
    ] = Field(
        default_factory=dict,
        description="Measured points, TFLOP of work in one step -> the share of the peak the stage reached; a "
        "stage listed here gets its utilisation from them (log-linear between points, the end point's beyond "
        "them), not from `utilisation`.",
    )


class HostRates(Frozen):
    cpu_cores: int = Field(gt=0)
    cpu_cores_source: str
    decode_resize_ms: dict[Literal["2x", "1x"], float] = Field(
        description="CPU ms to decode and resize one image (one core), per encode.jpeg_draft."
    )
    write_ms_per_mb: Precisions = Field(
        description="CPU ms to compress and write one stored MB (features and pixels), per precision."
    )
    loader_ms_per_mb: Precisions = Field(description="Train loader ms per MB of float16-sized features.")
    source: str


class StoredBytes(Frozen):
    features: Precisions = Field(description="Stored bytes per raw float16 feature byte, per precision.")
    pixels: float = Field(gt=0, description="Stored bytes per raw uint8 pixel byte.")
    source: str


class Rates(Frozen):
    gpu: GpuRates
    host: HostRates
    stored_bytes: StoredBytes
    flop_twins: dict[str, str] = Field(
        default_factory=dict, description="model_id -> the timm architecture counted in its place."
    )
