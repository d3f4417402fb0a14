"""What the stages after encode do: the reconstructor and its training, the operator fits, the evaluation, and
how Prefect orchestrates them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from pipeline.config.base import Frozen, Name, Runtime, Seed
from pipeline.config.inputs import TransformSpec

Beta = Annotated[float, Field(ge=0, lt=1)]  # Adam's decay rates


class ReconstructorConfig(Frozen):
    """The reconstructor; defaults are the authors' released architecture (docs/train.md lists each choice)."""

    depth: int = Field(
        4, ge=0, le=64, description="Transformer layers over the token grid (paper and released code: 4)."
    )
    width_multiplier: float = Field(
        1.0, gt=0, le=8, description="Transformer width = encoder width x this (released: 1)."
    )
    head_dim: int = Field(
        64, gt=0, le=1024, description="Attention heads = width / head_dim (released: 768 / 12)."
    )
    mlp_ratio: float = Field(4.0, gt=0, le=16, description="MLP width / transformer width (released: 4).")
    positional_embedding: Literal["none", "learned"] = Field(
        "none",
        description="The released code has none (default); 'learned' adds one per token (a departure).",
    )
    class_token: bool = Field(
        True, description="Prepend a class token drawn from N(0, 1), as the released CLIP-style embeddings."
    )
    upsample_kernel: Literal[4, 2] = Field(
        4,
        description="Kernel of each x2 ConvTranspose2d: 4 (padding 1) as released; 2 is a lighter departure "
        "(a quarter of the up-conv weights, no overlap between neighbouring outputs).",
    )
    last_stage_res_blocks: int = Field(
        3,
        ge=1,
        le=16,
        description="Residual conv blocks at the last upsampling stage (released: 3; others have 1).",
    )
    layer_norm_eps: float = Field(
        1e-6, gt=0, le=1e-2, description="LayerNorm epsilon (released: its SigLIP vision config's 1e-6)."
    )
    min_channels: int = Field(
        8,
        gt=0,
        le=4096,
        description="Floor for the halving decoder channels (only narrow encoders reach it).",
    )
    resize_mode: Literal["bilinear", "bicubic"] = Field(
        "bilinear",
        description="When patch size is not a power of two (DINOv2's 14), the decoder upsamples to the next power "
        "of two and resizes to the encoder's resolution with this filter (reconlab's choice; the released code "
        "handles patch 16 only).",
    )


class TrainConfig(Frozen):
    """Reconstructor training (paper defaults: Adam 3e-4, betas (0.9, 0.999), 5% warm-up, batch 10, 40 epochs)."""

    output_root: Path = Runtime(Path("runs/train"), description="Folder of content-addressed training runs.")
    train_split: Name = Field("train", description="Split whose store trains R.")
    val_split: Name = Field("val", description="Held-out split whose store validates R.")
    model: ReconstructorConfig = Field(ReconstructorConfig(), description="Reconstructor architecture.")
    batch_size: int = Field(10, gt=0, description="Per device (paper: 10; released code: 32).")
    epochs: int = Field(40, gt=0, description="Passes over the train store (paper: 40).")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate (paper: 3e-4).")
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="Adam betas (paper: 0.9, 0.999).")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay (paper: none).")
    warmup_fraction: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Share of steps warming up linearly from lr/25 to lr before cosine decay to lr/25e4 (released: 0.05).",
    )
    grad_clip_norm: float | None = Field(
        None, gt=0, description="Clip the gradient norm to this (None: off)."
    )
    l1_weight: float = Field(0.0, ge=0, description="Extra pixel-space L1 loss weight (off by default).")
    seed: Seed = Field(0, description="Seeds initialisation, data order and resampling.")
    select_checkpoint: Literal["last", "best_val"] = Field(
        "last",
        description="The checkpoint later stages use: 'last' (the paper's fixed schedule; val_split only monitors "
        "training) or 'best_val' (best PSNR on val_split: those images then selected R, and evaluate/operators "
        "refuse to score them).",
    )
    val_every_steps: int = Runtime(200, gt=0, description="Validate every N steps and at every epoch end.")
    n_val_images: int | None = Field(256, gt=0, description="Validate on the first N val images (None: all).")
    n_sample_images: int = Runtime(8, gt=0, description="Images in the validation grid PNG.")
    keep_last: int = Runtime(2, gt=0, description="Epoch checkpoints kept (plus best).")
    shuffle_buffer_images: int = Field(512, gt=0, description="In-memory shuffle buffer (bounds memory).")
    prefetch_batches: int = Runtime(4, gt=0, description="Batches the loader's worker process keeps ready.")
    device: Literal["auto", "cpu", "cuda"] = Runtime(
        "auto", description="auto: CUDA when available, else CPU."
    )
    compute_dtype: Literal["auto", "bfloat16", "float32"] = Runtime(
        "auto", description="auto: bfloat16 autocast on CUDA, float32 on CPU."
    )
    compile: bool = Runtime(False, description="torch.compile the model (CUDA).")


class OperatorPairSpec(Frozen):
    """Which feature pairs to fit: forward (f(x) -> f(T x)) or inverse (f(T x) -> f(x), e.g. colorization)."""

    transform: TransformSpec
    direction: Literal["forward", "inverse"] = "forward"
    alphas: list[float] | None = Field(
        None, description="scale_channel only: fit one operator per alpha (overrides transform.alpha)."
    )

    def expand(self) -> list[OperatorPairSpec]:
        if not self.alphas:
            return [self]
        return [
            OperatorPairSpec(
                transform=self.transform.model_copy(update={"alpha": a}), direction=self.direction
            )
            for a in self.alphas
        ]


def _default_pairs() -> list[OperatorPairSpec]:
    return [
        OperatorPairSpec(transform=TransformSpec(name="swap_rb")),
        OperatorPairSpec(transform=TransformSpec(name="scale_channel", channel="b", alpha=0.5)),
        OperatorPairSpec(transform=TransformSpec(name="grayscale"), direction="inverse"),
    ]


class OperatorsConfig(Frozen):
    """Feature-space operators (paper: colour swap, blue suppression, colorization)."""

    output_root: Path = Runtime(
        Path("runs/operators"), description="Folder of content-addressed operator fits."
    )
    encoders: list[str] | None = Runtime(None, description="Encoders to study (default: the run's first).")
    split: Name = Field(
        "val", description="Held-out split the pairs come from (disjoint from training images)."
    )
    pairs: list[OperatorPairSpec] = Field(
        default_factory=_default_pairs,
        description="Transforms and directions to fit (default: the paper's three).",
    )
    fits: list[Literal["procrustes", "involution", "least_squares"]] | None = Field(
        None,
        description="Operator fits to compare. None: the paper's per transform (colour swap: involution, "
        "procrustes, least_squares; suppression and colorization: least_squares, procrustes). 'involution' only "
        "runs for transforms that are their own inverse; the table says why where it did not.",
    )
    ridge: float = Field(0.0, ge=0, description="Ridge penalty of the least-squares fit.")
    n_fit_images: int = Field(
        1024, gt=0, description="Fit on the first N held-out images, test on the rest (paper)."
    )
    n_eval_images: int | None = Field(256, gt=0, description="Test images reconstructed for pixel metrics.")
    n_grid_images: int = Runtime(6, gt=0, description="Held-out images shown in the figure grids.")
    eigen_tolerance: float = Field(
        0.1,
        gt=0,
        description="Band around the unit circle: |λ| within 1 ± this is 'on the circle' "
        "(and |λ ∓ 1| below it 'near ±1'); below it 'inside', above it 'outside'.",
    )
    dask_address: str | None = Runtime(None, description="dask.distributed scheduler address; None: threads.")


class ComparisonSpec(Frozen):
    """One paired comparison a vs b; a directional hypothesis such as 'SigLIP2 > SigLIP' is a=siglip2-..., b=siglip-...,
    alternative: greater."""

    a: str
    b: str
    alternative: Literal["two-sided", "greater", "less"] | None = Field(
        None, description="About mean(a - b); None: evaluate.alternative."
    )

    @model_validator(mode="before")
    @classmethod
    def _from_pair(cls, value: Any) -> Any:
        if isinstance(value, list | tuple) and len(value) == 2:
            return {"a": value[0], "b": value[1]}
        return value


class EvaluateConfig(Frozen):
    """Scores of held-out reconstructions, paired statistics, ranking and the report."""

    output_root: Path = Runtime(Path("runs/evaluate"), description="Scores cache and reports.")
    encoders: list[str] | None = Runtime(None, description="Encoders to evaluate (default: all of the run).")
    split: Name = Field("val", description="Held-out split whose reconstructions are scored.")
    judges: list[str] = Field(
        default_factory=lambda: ["judge-clip-vit-l14", "judge-siglip2-l16-256"],
        description="Judge encoder specs (keep_head: true); the first judge's first mode ranks the encoders.",
    )
    judge_modes: list[Literal["grayscale", "color"]] = Field(
        default_factory=lambda: ["grayscale", "color"],
        description="The released code converts both images to grayscale before judging (first = primary).",
    )

    def judge_names(self) -> list[str]:
        """The judges by name: one given as a YAML path is named by its file (its spec's `name`)."""
        return [Path(j).stem if j.endswith((".yaml", ".yml")) else j for j in self.judges]

    judge_input_resolution: int | None = Field(
        224,
        gt=0,
        description="Judges see both images resized to this first (bilinear, no antialiasing, truncated to "
        "uint8), as the released code does; None: at the encoder's resolution (reconlab's alternative).",
    )
    pixel_resolution: int = Field(
        224, gt=0, description="Common resolution of the pixel metrics (released code: 224)."
    )
    lpips: bool = Field(
        True, description="Add LPIPS when the `lpips` package and its weights are available locally."
    )
    n_images: int | None = Field(
        None, gt=0, description="Score the first N valid held-out images (None: all)."
    )
    batch_size: int = Runtime(32, gt=0, description="Images reconstructed and judged at once.")
    n_boot: int = Field(10_000, ge=100, description="Bootstrap resamples (BCa CI and the bootstrap p-value).")
    n_permutations: int = Field(
        10_000,
        ge=100,
        description="Sign-flip permutations; the test is exact (all 2^n flips) when 2^n <= this, else Monte Carlo.",
    )
    alternative: Literal["two-sided", "greater", "less"] = Field(
        "two-sided",
        description="Alternative of every test for comparisons that do not state their own: about mean(a - b).",
    )
    alpha: float = Field(
        0.05, gt=0, lt=1, description="Significance level (after Holm) for the ranking's ties."
    )
    seed: Seed = Field(0, description="Seeds initialisation, data order and resampling.")
    comparisons: list[ComparisonSpec] | None = Field(
        None,
        description="Encoder pairs to test, as [a, b] or {a, b, alternative} (default: every pair, two-sided); "
        "Holm-corrected as one family per score.",
    )
    n_grid_images: int = Runtime(6, gt=0, description="Held-out images shown in the figure grids.")
    device: Literal["auto", "cpu", "cuda"] = Runtime(
        "auto", description="auto: CUDA when available, else CPU."
    )


class OrchestrationConfig(Frozen):
    """How Prefect runs the stages; never part of any artifact's identity."""

    parallel_tasks: int = Runtime(
        1, ge=1, le=64,
        description="Stores encoded and operator fits run at once, as concurrent Prefect tasks on threads (1 on "
        "CPU, where one encode already uses every core; e.g. the number of GPUs otherwise). Two tasks never write "
        "one store.",
    )  # fmt: skip
    task_runner: Literal["threads", "dask"] = Runtime(
        "threads",
        description="Where Prefect runs the stage tasks: threads of the flow's process, or Dask workers (prefect-dask): "
        "a local cluster of parallel_tasks single-threaded worker processes, or the scheduler at dask_address.",
    )
    dask_address: str | None = Runtime(
        None,
        description="task_runner dask: a running Dask scheduler (tcp://host:8786); none: a local cluster.",
    )
    retries: int = Runtime(1, ge=0, le=10, description="Retries of a task after a transient fault (I/O, device); "
                           "never after a user error (config, weights, held-out checks).")  # fmt: skip
    retry_delay_s: float = Runtime(10.0, ge=0, description="Seconds between retries.")
    lock_wait_s: float = Runtime(
        86_400.0, ge=0,
        description="A flow whose artifact another run is writing waits this long for it (then uses its result) "
        "instead of failing; 0 fails at once.",
    )  # fmt: skip
