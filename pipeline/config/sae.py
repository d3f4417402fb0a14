"""The SAE stage: sparse autoencoders on a store's patch tokens. The papers (arXiv:2504.11695, arXiv:2508.11277)
give no expansion factor, k, L1/L0 coefficient, learning rate or steps: every default below is reconlab's choice
and the report says so."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from pipeline.config.base import Frozen, Name, Runtime, Seed

Variant = Literal["batchtopk", "topk", "jumprelu", "relu"]


class SaeConfig(Frozen):
    """Patch-token SAEs of one or more encoders' stores, a sparsity sweep per variant for the Pareto table, extra
    seeds of the primary setting for stability, and looks at concepts through the encoder's reconstructor.
    Absent from a run config: the run has no SAE stage."""

    output_root: Path = Runtime(Path("runs/sae"), description="Folder of content-addressed SAE runs.")
    encoders: list[str] | None = Runtime(
        None,
        min_length=1,
        description="Encoders whose tokens are studied (default: the first; [] is an error).",
    )
    train_split: Name = Field("train", description="Split whose store trains the SAEs.")
    split: Name = Field("val", description="Held-out split of every metric (disjoint from train_split).")
    inputs: Literal["tokens", "embeddings"] = Field(
        "tokens",
        description="tokens: one vector per patch token of the stores (reconlab's own mode); embeddings: the pooled "
        "image embeddings (encode.embeddings) and caption embeddings (text-encode stage) of one vision-language "
        "model together, as arXiv:2504.11695.",
    )
    text_shares: list[Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=lambda: [0.5], min_length=1,
        description="embeddings: share of caption vectors in each training batch (the image:text mix the paper "
        "varies); the first is the primary, the others train the primary setting once more (stability across mixes).",
    )  # fmt: skip
    batch_vectors: int = Field(1024, gt=0, description="embeddings: vectors per training step.")
    n_bridges: int = Runtime(10, gt=0, description="embeddings: bridges listed in the report.")
    variants: list[Variant] = Field(
        default_factory=lambda: ["batchtopk", "topk", "jumprelu", "relu"],
        min_length=1,
        description="Variants trained; the first is the primary (BatchTopK: the best trade-off in arXiv:2504.11695).",
    )
    expansion: int = Field(8, ge=1, le=256, description="Dictionary size = expansion x feature width.")
    k: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=lambda: [16, 32, 64], min_length=1,
        description="Active latents per vector swept for topk / batchtopk; the primary setting uses the middle one.",
    )  # fmt: skip
    l0_coefficients: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [1e-3, 3e-3, 1e-2], min_length=1, description="JumpReLU L0 penalties swept."
    )
    l1_coefficients: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [0.03, 0.1, 0.3], min_length=1, description="ReLU L1 penalties swept."
    )
    jumprelu_threshold: float = Field(
        0.05,
        gt=0,
        description="JumpReLU's initial threshold, in the units of unit-norm inputs' pre-activations.",
    )
    jumprelu_bandwidth: float = Field(
        0.05, gt=0, description="Width of JumpReLU's straight-through kernel (same units as the threshold)."
    )
    seeds: list[Seed] = Field(
        default_factory=lambda: [0, 1], min_length=1,
        description="Every setting trains with the first seed; the primary setting also with the others (stability).",
    )  # fmt: skip
    unit_norm_inputs: bool = Field(
        True, description="Unit L2 per vector before the SAE (the papers' normalisation)."
    )
    center: bool = Field(False, description="Subtract the training mean first (before the unit norm).")
    decoder_bias: bool | None = Field(
        None,
        description="x̂ = W_dec z + b, b also subtracted before encoding (arXiv:2406.04093), or x̂ = D z without one "
        "(arXiv:2504.11695 and overcomplete). None: without in `embeddings` mode (the paper's), with in `tokens` mode.",
    )

    def uses_decoder_bias(self) -> bool:
        return self.inputs == "tokens" if self.decoder_bias is None else self.decoder_bias

    aux_coefficient: float = Field(
        1 / 32, ge=0, description="AuxK weight for dead latents (arXiv:2406.04093)."
    )
    dead_window: int = Field(
        100_000, gt=0, description="A latent is dead after this many training vectors without firing (AuxK)."
    )
    dense_frequency: float = Field(
        0.1, gt=0, le=1, description="A latent firing on more vectors than this is dense."
    )
    epochs: int = Field(5, gt=0, description="Passes over the train store per SAE.")
    batch_images: int = Field(16, gt=0, description="Images per step (all their tokens).")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate, constant.")
    shuffle_buffer_images: int = Field(512, gt=0, description="In-memory shuffle buffer (bounds memory).")
    n_eval_images: int | None = Field(
        256, ge=2, description="Held-out images of every metric (None: all; R² needs at least 2 to vary)."
    )
    n_edit_latents: int = Field(3, ge=0, description="Latents of the primary SAE edited and reconstructed.")
    edit_scale: float = Field(
        0.0, ge=0, description="An edited latent's activation is multiplied by this (0: removed)."
    )
    n_sheet_latents: int = Runtime(8, ge=0, description="Latents with a top-activating-images sheet.")
    n_grid_images: int = Runtime(6, gt=0, description="Images per edit grid and activation sheet.")
    device: Literal["auto", "cpu", "cuda"] = Runtime(
        "auto", description="auto: CUDA when available, else CPU."
    )
    compute_dtype: Literal["auto", "bfloat16", "float32"] = Runtime(
        "auto", description="auto: bfloat16 autocast on CUDA, float32 on CPU."
    )

    @model_validator(mode="after")
    def _check(self) -> SaeConfig:
        if self.train_split == self.split:
            raise ValueError(f"split '{self.split}' is train_split: metrics must be on held-out images")
        if len(set(self.text_shares)) != len(self.text_shares):
            raise ValueError("text_shares must not repeat")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must not repeat")
        return self
