"""The token utility stage (arXiv:2503.16660): learned token selection against random and token-norm baselines.
Defaults follow the paper where it states them; every other default is reconlab's choice and says so."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from pipeline.config.base import Frozen, Name, Runtime, Seed

METHODS = ("learned", "random", "norm")


class TokenNetworkConfig(Frozen):
    """Selector and completion networks (paper: three transformer layers each; width and heads not stated)."""

    depth: int = Field(3, ge=1, le=24, description="Transformer layers of each network (paper: 3).")
    width: int | None = Field(
        None, gt=0, le=8192, description="Transformer width; None: the encoder's (reconlab's choice)."
    )
    head_dim: int = Field(64, gt=0, le=1024, description="Heads = width / head_dim (reconlab's choice).")


class TokensConfig(Frozen):
    """Learned token selection vs random and token-norm selection, judged in feature space and, through the
    encoder's trained reconstructor, in pixels. Absent from a run config: the run has no tokens stage."""

    output_root: Path = Runtime(Path("runs/tokens"), description="Folder of content-addressed token runs.")
    encoders: list[str] | None = Runtime(
        None,
        min_length=1,
        description="Encoders to study (default: the run's first; [] names none: an error).",
    )
    train_split: Name = Field("train", description="Split whose store trains the selectors and completions.")
    split: Name = Field(
        "val", description="Held-out split the selections are evaluated on (disjoint from train_split)."
    )
    fractions: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=lambda: [0.1, 0.2, 0.3, 0.5, 0.7, 0.9],
        min_length=1,
        description="Keep fractions p evaluated (k = round(p * tokens) kept, at least one).",
    )
    selectors: Literal["per_fraction", "shared"] = Field(
        "per_fraction",
        description="per_fraction: one selector (and one completion per baseline) trained at each p, as the paper "
        "trains with a given p and evaluates at it; shared: one of each for all p, trained at shared_fraction "
        "(baseline completions on k drawn from `fractions` per batch), top-k at inference (reconlab's option).",
    )
    shared_fraction: float = Field(0.5, gt=0, le=1, description="Target p of the shared selector.")
    network: TokenNetworkConfig = TokenNetworkConfig()
    gumbel_tau: float = Field(
        1.0, gt=0, description="Gumbel-Softmax temperature, constant (paper: not stated; reconlab's choice)."
    )
    loss: Literal["mse", "cosine"] = Field(
        "mse",
        description="Reconstruction term: mse = mean squared error over the whole token tensor on raw features "
        "(the paper's l2; its reduction is not stated: the mean is reconlab's reading); cosine is a departure.",
    )
    loss_tokens: Literal["all", "dropped"] = Field(
        "all", description="all tokens (paper) or the dropped ones only (a departure)."
    )
    normalize_tokens: bool = Field(
        False, description="L2-normalise tokens before the loss (a departure; the paper uses raw features)."
    )
    keep_penalty: Literal["floor", "band"] = Field(
        "floor",
        description="floor: + max(L_pr, p), the paper's; band: + |L_pr - p| (a departure: also penalises keeping "
        "fewer than p).",
    )
    epochs: int = Field(20, gt=0, description="Passes over the train store per network (reconlab's choice).")
    batch_size: int = Field(32, gt=0, description="Images per step (reconlab's choice).")
    lr: float = Field(3e-4, gt=0, description="Adam learning rate, constant (reconlab's choice).")
    seed: Seed = Field(0, description="Seeds initialisation, data order, Gumbel noise and random masks.")
    shuffle_buffer_images: int = Field(512, gt=0, description="In-memory shuffle buffer (bounds memory).")
    n_eval_images: int | None = Field(
        256, gt=0, description="Evaluate on the first N held-out images (None: all)."
    )
    judge: str | None = Field(
        None, description="Judge encoder of the image-space cosine; None: evaluate.judges' first."
    )
    judge_input_resolution: int | None = Field(
        224, gt=0, description="As evaluate.judge_input_resolution (the released code's 224)."
    )
    n_boot: int = Field(2000, ge=100, description="Bootstrap resamples of CIs and paired tests.")
    grid_fraction: float | None = Field(
        None, gt=0, le=1, description="Keep fraction shown in the grids; None: the one nearest 0.3."
    )
    n_grid_images: int = Runtime(6, gt=0, description="Held-out images shown in the grids.")
    batch_size_eval: int = Runtime(32, gt=0, description="Images completed and reconstructed at once.")
    device: Literal["auto", "cpu", "cuda"] = Runtime(
        "auto", description="auto: CUDA when available, else CPU."
    )
    compute_dtype: Literal["auto", "bfloat16", "float32"] = Runtime(
        "auto", description="auto: bfloat16 autocast on CUDA, float32 on CPU."
    )

    @model_validator(mode="after")
    def _check(self) -> TokensConfig:
        if len(set(self.fractions)) != len(self.fractions):
            raise ValueError("fractions must not repeat")
        if self.train_split == self.split:
            raise ValueError(f"split '{self.split}' is train_split: evaluation must be on held-out images")
        return self

    @property
    def trained_fractions(self) -> list[float]:
        """The target p of each trained selector / completion."""
        return sorted(self.fractions) if self.selectors == "per_fraction" else [self.shared_fraction]
