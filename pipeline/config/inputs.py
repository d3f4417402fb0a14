"""What a feature store is made of: encoder specs, datasets and splits, subsets, pixel transforms, storage and
encode options (all part of a store's key except the fields marked Runtime)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from pipeline.config.base import Frozen, Name, NegativeLayer, Runtime, Seed

Layer = Literal["last"] | NegativeLayer


class EncoderSpec(Frozen):
    """One frozen vision encoder and how its patch features are taken."""

    name: Name = Field(description="Short name; also the YAML file name under configs/encoders/.")
    backend: Literal["timm", "transformers"] = Field(description="Library that builds the model.")
    model_id: str = Field(description="timm model name (with pretrained tag) or Hugging Face repo id.")
    resolution: int = Field(gt=0, description="Square input resolution in pixels.")
    patch_size: int = Field(
        gt=0,
        description="ViT patch size, or a CNN stage's stride; the feature grid is resolution / patch_size.",
    )
    feature_layer: Layer = Field(
        -2,
        description="'last' = the model's final token output (timm forward_features, HF last_hidden_state); a negative int = that block's raw output, "
        "indexed like hidden_states (-1 = last block, -2 = second to last, as the paper's released code). CNNs "
        "(timm models without transformer blocks): a stage's output, counted from the last (-1 = last stage).",
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
    seed: Seed = Field(0, description="Seed of the random init when weights == 'random'.")
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


class EncoderEntry(Frozen):
    """An `encoders:` entry that asks for more than a spec file: several feature layers of one encoder (each its
    own store, all from one forward pass), or a model named by its timm / Hugging Face id with its options
    inline (the spec is derived from the model's own config: pipeline/models/model_ids.py)."""

    encoder: str = Field(
        description="An encoder name (configs/encoders/NAME.yaml), a spec YAML path, 'timm:<model id>' or "
        "'hf:<repo id>'."
    )
    name: Name | None = Field(None, description="Name of a model given by id (default: derived from the id).")
    layer: Layer | None = Field(None, description="One feature layer (default: the spec's, -2 for ids).")
    layers: list[Layer] | None = Field(
        None,
        min_length=1,
        description="Several feature layers, one store each from one forward pass; named NAME.L-1, NAME.L-4, "
        "... (the spec's own feature_layer keeps NAME)",
    )
    every: int | None = Field(
        None,
        gt=0,
        description="Every k-th block counted back from the last (-1, -1-k, ...), instead of layers.",
    )
    resolution: int | None = Field(None, gt=0, description="Model by id: input side (default: the model's).")
    weights: str | None = Field(
        None, description="Model by id: as EncoderSpec.weights (default: pretrained)."
    )
    revision: str | None = Field(None, description="Model by id: Hugging Face revision.")
    seed: Seed | None = Field(None, description="Model by id: seed of a random init.")
    trust_remote_code: bool | None = Field(None, description="Model by id: needed by remote-code models.")
    model_kwargs: dict[str, Any] | None = Field(None, description="Model by id: extra model arguments.")

    @model_validator(mode="after")
    def _consistent(self) -> EncoderEntry:
        chosen = [k for k in ("layer", "layers", "every") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ValueError(f"give one of layer, layers or every, not {' and '.join(chosen)}")
        if self.layers and len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers {self.layers} repeat a layer")
        by_id = self.encoder.startswith(("timm:", "hf:"))
        options = [k for k in ID_OPTIONS if getattr(self, k) is not None]
        if options and not by_id:
            raise ValueError(
                f"{', '.join(options)} apply to a model given by id ('timm:...' or 'hf:...'); '{self.encoder}' is a "
                "spec: change them in its YAML"
            )
        return self

    @property
    def by_id(self) -> bool:
        return self.encoder.startswith(("timm:", "hf:"))


ID_OPTIONS = ("name", "resolution", "weights", "revision", "seed", "trust_remote_code", "model_kwargs")


def _encoder_form(value: Any) -> str | None:
    if isinstance(value, str):
        return "<name>"
    if isinstance(value, EncoderEntry) or (isinstance(value, dict) and "encoder" in value):
        return "<EncoderEntry>"
    if isinstance(value, EncoderSpec | dict):
        return "<EncoderSpec>"
    return None


# One `encoders:` item, validated as the one form its shape says, so that a mistake in it is reported against that
# form alone, not drowned in every other form's complaints. The tags (in `<>`) are left out of error messages.
EncoderItem = Annotated[
    Annotated[str, Tag("<name>")]
    | Annotated[EncoderSpec, Tag("<EncoderSpec>")]
    | Annotated[EncoderEntry, Tag("<EncoderEntry>")],
    Discriminator(
        _encoder_form,
        custom_error_type="encoder_form",
        custom_error_message="an encoder is a name, a spec mapping, or a mapping {encoder: NAME, ...}",
    ),
]


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
    seed: Seed | None = Field(
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
Compressor = Literal["auto", "blosc_zstd_bitshuffle", "blosc_zstd_shuffle", "zstd", "blosc_lz4", "none"]


class StoreOptions(Frozen):
    precision: Precision = Field(
        "float16",
        description="float16 (default), float32, bf16_bitround (float32 with the mantissa rounded to bf16's 7 bits before "
        "writing, standard codecs only: rel. error <= 2^-8, 0.64x a bf16 .pt), int8_per_token (int8 + a float32 scale per token).",
    )
    compressor: Compressor = Field(
        "auto",
        description="Byte codec. auto (measured per array): blosc lz4 for float16/float32 features (zstd gains "
        "only 1.1x there at 10x the decode time) and int8_per_token codes, blosc zstd level 1 + byte shuffle in "
        "1 MiB blocks for bf16_bitround (as small as level 7 in blosc's own blocks at 512 px, 3-5 % larger at "
        "224, and 10x faster to write), lz4 for pixels. A named codec applies to every array; stores encoded "
        "before `auto` existed used blosc_zstd_shuffle: name it to keep using them.",
    )
    compression_level: int | None = Field(
        None,
        ge=1,
        le=9,
        description="Features' codec level; None: auto's (lz4 5, zstd 1), or for a named codec 7 for "
        "bf16_bitround and 3 otherwise (measured).",
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
    writer_threads: int = Runtime(
        1,
        ge=1,
        description="Threads that compress and write finished shards (one writes ~600 ViT-B@224 images/s on "
        "one core; a GPU host feeding thousands of images/s needs several).",
    )
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
    resize: Literal["torch", "pil"] = Field(
        "torch",
        description="Resampler of the resize to the encoder's input. torch: torch's antialiased uint8 resize "
        "(the encoder's own filter, within 2 levels of PIL's, ~5x faster: the decode workers' main cost); pil: "
        "PIL's, as timm/transformers eval transforms (stores encoded before 2026-11-27 used it). Filters other "
        "than bilinear/bicubic always use PIL.",
    )
    jpeg_draft: Literal["2x", "1x"] = Field(
        "2x",
        description="How small a JPEG may decode (libjpeg's DCT scaling by 1/2, 1/4, 1/8, before the resize). "
        "2x: both sides stay >= twice the encoder's input side, so the resize still filters the image's own "
        "samples (a 640x480 photo decodes in full for 224 px; the paper's preprocessing decodes in full). 1x: >= "
        "the side the resize targets, ~2x faster decode + resize of COCO-sized photos to 224 px; the pixels "
        "differ from a full decode by ~41 dB PSNR (reconlab's option, not the paper's; docs/benchmarks.md).",
    )
    min_image_side: int = Field(16, gt=0, description="Images with a smaller side are skipped as failures.")
    max_image_pixels: int = Field(
        178_956_970, gt=0, description="Images with more pixels are skipped (decompression-bomb guard)."
    )
    embeddings: bool = Field(
        False,
        description="Also store each image's pooled (projected) embedding, `embeddings` [N, E], for encoders with "
        "keep_head: true (the input of embedding SAEs; one more forward pass through the head).",
    )
