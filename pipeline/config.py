"""Typed, frozen run configs loaded from YAML.

Every model forbids unknown keys; `pipeline.config_files` loads them from YAML and turns a bad file into an
error naming the file, the dotted field path, what is allowed and what was given, before any work starts.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, field and fix."""


# Marker of fields that tune how a result is produced or shown (progress, workers, validation cadence, checkpoint
# rotation, output paths, cluster address), never what it is.
RUNTIME = {"runtime": True}


def Runtime(default: Any, **kwargs: Any) -> Any:  # noqa: N802 (reads like Field)
    """A config field that tunes how a result is produced or shown, never what it is: left out of every
    artifact's identity (pipeline.artifacts.identity), so changing it re-uses finished work."""
    return Field(default, json_schema_extra=RUNTIME, **kwargs)


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


NegativeLayer = Annotated[int, Field(lt=0)]

_NAME_CHARS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


def _folder_safe(name: str) -> str:
    if not _NAME_CHARS.fullmatch(name):
        raise ValueError(
            "names become parts of folder names: 1-64 letters, digits, '.', '_', '+' or '-', not starting with "
            "'.' or '-' (no '/', no '..')"
        )
    return name


# Dataset, split and encoder names: they are placed in artifact folder names, so none can leave its root.
Name = Annotated[str, AfterValidator(_folder_safe)]


class EncoderSpec(Frozen):
    """One frozen vision encoder and how its patch features are taken."""

    name: Name = Field(description="Short name; also the YAML file name under configs/encoders/.")
    backend: Literal["timm", "transformers"] = Field(description="Library that builds the model.")
    model_id: str = Field(description="timm model name (with pretrained tag) or Hugging Face repo id.")
    resolution: int = Field(gt=0, description="Square input resolution in pixels.")
    patch_size: int = Field(gt=0, description="ViT patch size; the token grid is resolution / patch_size.")
    feature_layer: Literal["last"] | NegativeLayer = Field(
        -2,
        description="'last' = the model's final token output (timm forward_features, HF last_hidden_state); a negative int = that block's raw output, "
        "indexed like hidden_states (-1 = last block, -2 = second to last, as the paper's released code).",
    )
    n_prefix_tokens: int | None = Field(
        None,
        ge=0,
        description="CLS/register tokens expected before the patch tokens; checked against the model.",
    )
    preprocessing_source: Literal["timm_pretrained_cfg", "hf_image_processor"] = Field(
        description="Where resize/crop/mean/std come from: the model's own config, never re-typed."
    )
    weights: str = Field(
        "pretrained",
        description="'pretrained' (Hugging Face cache / hub, honours HF_HUB_OFFLINE), 'random' (seeded random "
        "init, for demos and tests), or a local path: a timm checkpoint file or a save_pretrained directory.",
    )
    revision: str | None = Field(None, description="Hugging Face revision (commit, branch or tag) to load.")
    seed: int = Field(0, description="Seed of the random init when weights == 'random'.")
    trust_remote_code: bool = Field(False, description="Needed by models with remote code (InternViT).")
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword args for the model."
    )
    hidden_dim: int | None = Field(
        None, gt=0, description="Expected feature width D; checked against the model."
    )
    keep_head: bool = Field(
        False,
        description="Keep the projection head: judges score images by their pooled, projected embedding.",
    )
    input_transform: TransformSpec | None = Field(
        None,
        description="A pixel transform applied to what this encoder sees, not to the stored target pixels: an "
        "encoder whose information loss is known by construction (e.g. {name: resample, factor: 4}).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> EncoderSpec:
        if self.resolution % self.patch_size:
            raise ValueError(
                f"resolution {self.resolution} is not a multiple of patch_size {self.patch_size}; "
                f"use e.g. {self.resolution // self.patch_size * self.patch_size}"
            )
        expected = {"timm": "timm_pretrained_cfg", "transformers": "hf_image_processor"}[self.backend]
        if self.preprocessing_source != expected:
            raise ValueError(f"backend '{self.backend}' takes its preprocessing from '{expected}'")
        return self

    @property
    def grid(self) -> tuple[int, int]:
        side = self.resolution // self.patch_size
        return side, side


class SplitSpec(Frozen):
    images_dir: Path = Field(description="Folder with the split's image files.")
    annotations: Path | None = Field(
        None, description="COCO instances or captions JSON (kind: coco). Absent for kind: folder."
    )


class DatasetSpec(Frozen):
    """Where images come from. kind 'demo' is built from scikit-image's photos under `root` if absent."""

    name: Name = Field(description="Dataset name; part of store names and keys.")
    kind: Literal["coco", "folder", "demo"] = Field(
        description="COCO annotations, a plain folder, or the demo set."
    )
    root: Path = Field(Path("data/demo"), description="Dataset root; split paths are relative to it.")
    splits: dict[Name, SplitSpec] = Field(
        default_factory=dict, description="Per split: images folder (+ annotations for coco)."
    )

    @model_validator(mode="after")
    def _splits_present(self) -> DatasetSpec:
        if self.kind == "coco" and not self.splits:
            raise ValueError("kind 'coco' needs splits: {name: {images_dir: ..., annotations: ...}}")
        if self.kind == "coco":
            missing = [name for name, s in self.splits.items() if s.annotations is None]
            if missing:
                raise ValueError(f"kind 'coco' needs 'annotations' for split(s) {missing}")
        return self


class SubsetSpec(Frozen):
    max_images: int | None = Field(None, gt=0, description="Keep at most this many images per split.")
    seed: int | None = Field(
        None, description="None: the first max_images by image id; an int: a seeded random subset."
    )


class TransformSpec(Frozen):
    """A pixel-space image transform applied before the encoder's preprocessing (pipeline/data/transforms.py)."""

    name: str = Field(
        "identity", description="A registered transform: identity, swap_rb, scale_channel, grayscale, ..."
    )
    channel: Literal["r", "g", "b"] | None = Field(None, description="scale_channel: which channel.")
    alpha: float | None = Field(None, ge=0, description="scale_channel: the factor.")
    factor: int | None = Field(None, ge=2, description="resample: shrink by this factor, then enlarge back.")

    @model_validator(mode="after")
    def _params(self) -> TransformSpec:
        from pipeline.data.transforms import REGISTRY

        if self.name not in REGISTRY:
            raise ValueError(f"unknown transform '{self.name}'; registered: {', '.join(REGISTRY)}")
        wanted = set(REGISTRY[self.name].params)
        given = {k for k in ("channel", "alpha", "factor") if getattr(self, k) is not None}
        if given != wanted:
            raise ValueError(
                f"transform '{self.name}' takes parameters {sorted(wanted) or 'none'}, got {sorted(given)}"
            )
        return self

    @property
    def params(self) -> dict:
        return {k: getattr(self, k) for k in ("channel", "alpha", "factor") if getattr(self, k) is not None}

    @property
    def tag(self) -> str:
        return self.name + "".join(
            f"-{v:g}" if isinstance(v, float) else f"-{v}" for v in self.params.values()
        )


Precision = Literal["float16", "float32", "bf16_bitround", "int8_per_token"]
Compressor = Literal["blosc_zstd_bitshuffle", "blosc_zstd_shuffle", "zstd", "blosc_lz4", "none"]


class StoreOptions(Frozen):
    precision: Precision = Field(
        "float16",
        description="float16 (default), float32, bf16_bitround (float32 with the mantissa rounded to bf16's 7 bits by a "
        "BitRound filter: rel. error <= 2^-8, 0.64x a bf16 .pt), int8_per_token (int8 + a float32 scale per token).",
    )
    compressor: Compressor = Field(
        "blosc_zstd_shuffle",
        description="Byte codec of features and pixels (byte shuffle measured best on ViT-B).",
    )
    compression_level: int | None = Field(
        None, ge=1, le=9, description="Codec level; None: 7 for bf16_bitround, 3 otherwise (measured)."
    )
    shard_images: int = Field(
        64, gt=0, description="Images per shard (the unit of resumable work); one image per inner chunk."
    )
    store_pixels: bool = Field(True, description="Also store the encoder-resolution uint8 image per row.")


class EncodeOptions(Frozen):
    batch_size: int = Runtime(
        32, gt=0, description="Images per forward pass (batches never straddle shards)."
    )
    num_workers: int = Runtime(2, ge=0, description="DataLoader workers that decode and resize images.")
    device: Literal["auto", "cpu", "cuda"] = Runtime(
        "auto", description="auto: CUDA when available, else CPU."
    )
    compute_dtype: Literal["auto", "bfloat16", "float32"] = Runtime(
        "auto", description="auto: bfloat16 autocast on CUDA, float32 on CPU."
    )
    geometry: Literal["short_side_crop", "native"] = Field(
        "short_side_crop",
        description="short_side_crop: every encoder sees the same field of view (short side resized to its "
        "resolution, centre square crop, no margin; the released evaluation code's geometry). native: each "
        "model's own eval transform (timm crop_pct margins, HF squash resizes).",
    )
    min_image_side: int = Field(16, gt=0, description="Images with a smaller side are skipped as failures.")
    max_image_pixels: int = Field(
        178_956_970, gt=0, description="Images with more pixels are skipped (decompression-bomb guard)."
    )


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
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas (paper: 0.9, 0.999).")
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
    seed: int = Field(0, description="Seeds initialisation, data order and resampling.")
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
    prefetch_batches: int = Runtime(4, gt=0, description="Batches the loader thread keeps ready.")
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
    seed: int = Field(0, description="Seeds initialisation, data order and resampling.")
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
    retries: int = Runtime(1, ge=0, le=10, description="Retries of a task after a transient fault (I/O, device); "
                           "never after a user error (config, weights, held-out checks).")  # fmt: skip
    retry_delay_s: float = Runtime(10.0, ge=0, description="Seconds between retries.")
    lock_wait_s: float = Runtime(
        86_400.0, ge=0,
        description="A flow whose artifact another run is writing waits this long for it (then uses its result) "
        "instead of failing; 0 fails at once.",
    )  # fmt: skip


class RunConfig(Frozen):
    """A reconlab run: which images, which encoders, where the stores go, how to encode."""

    store_root: Path = Runtime(
        Path("runs/stores"), description="Folder holding content-addressed feature stores."
    )
    dataset: DatasetSpec
    splits: list[Name] = Field(default_factory=lambda: ["train", "val"])
    subset: SubsetSpec = SubsetSpec()
    encoders: list[str | EncoderSpec] = Field(
        min_length=1, description="Encoder names (configs/encoders/NAME.yaml), YAML paths, or inline specs."
    )
    transforms: list[TransformSpec] = Field(default_factory=lambda: [TransformSpec()])
    store: StoreOptions = StoreOptions()
    encode: EncodeOptions = EncodeOptions()
    train: TrainConfig = TrainConfig()
    operators: OperatorsConfig = OperatorsConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()

    @model_validator(mode="after")
    def _identity_transform(self) -> RunConfig:
        if TransformSpec() not in self.transforms:
            raise ValueError(
                "transforms must include {name: identity}: training and evaluation use f(x) itself"
            )
        return self


def canonical_json(obj: Any) -> str:
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(obj: Any, n_chars: int = 16) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:n_chars]
