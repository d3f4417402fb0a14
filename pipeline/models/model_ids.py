"""What an `encoders:` entry stands for: the specs of a model named by id ('timm:<id>', 'hf:<repo>') and of
several feature layers of one encoder, derived from the model's own config (patch size or stage stride, width,
depth, input size), never typed by hand. Prefix tokens (CLS, registers) are left to the loader's probe, which
counts them on a real forward pass and records them in the store. And `check_architecture`: a spec whose network
differs from the one its weights were trained with is refused before any download."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import ConfigError, EncoderEntry, EncoderSpec, Layer
from pipeline.models import _torchvision_shim
from pipeline.models.weights import hf_cache_dir, offline


@dataclass(frozen=True)
class Architecture:
    """What reconlab needs to know of a network before loading its weights."""

    family: str  # 'vit': transformer blocks over patch tokens; 'cnn': stages of feature maps
    n_layers: int  # transformer blocks, or CNN stages (timm feature_info entries)
    strides: tuple[int, ...]  # per layer: the patch size (ViT, all equal) or the stage's stride (CNN)
    widths: tuple[int, ...]  # per layer: the feature width D
    resolution: int  # the model's default input side
    n_prefix_tokens: int | None = None  # a ViT's CLS/register tokens before the patch tokens

    def layer_index(self, layer: Layer) -> int:
        return self.n_layers - 1 if layer == "last" else self.n_layers + layer


def timm_architecture(model_id: str, model_kwargs: dict | None = None) -> Architecture:
    """A timm model built on the meta device (no memory, no weights): ViTs by their blocks and patch embedding,
    CNNs by the stages timm's `feature_info` lists."""
    # Cached by the kwargs' JSON: YAML gives lists (ConvNeXt `depths`, SAM `global_attn_indexes`), not hashable.
    return _timm_architecture(model_id, json.dumps(model_kwargs or {}, sort_keys=True))


@functools.lru_cache(maxsize=64)
def _timm_architecture(model_id: str, model_kwargs_json: str) -> Architecture:
    _torchvision_shim.install()
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(
                model_id, pretrained=False, num_classes=0, **json.loads(model_kwargs_json)
            )
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise ConfigError(f"timm does not know model '{model_id}' ({e}); see timm.list_models()") from None
    cfg = timm.models.get_pretrained_cfg(model_id)
    resolution = int((getattr(cfg, "input_size", None) or (3, 224, 224))[-1])
    if hasattr(model, "blocks") and hasattr(model, "patch_embed"):
        patch = model.patch_embed.patch_size
        patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        n = len(model.blocks)
        width = int(getattr(model, "embed_dim", model.num_features))
        prefix = getattr(model, "num_prefix_tokens", None)
        return Architecture(
            "vit", n, (patch,) * n, (width,) * n, resolution, prefix if isinstance(prefix, int) else None
        )
    info = getattr(model, "feature_info", None)
    if info and hasattr(model, "forward_intermediates"):
        return Architecture(
            "cnn", len(info), tuple(int(f["reduction"]) for f in info), tuple(int(f["num_chs"]) for f in info),
            resolution,
        )  # fmt: skip
    raise ConfigError(
        f"timm model '{model_id}' ({type(model).__name__}) has neither transformer blocks over a patch embedding "
        "nor feature stages with forward_intermediates; supported: timm ViTs (vit_*, eva*, samvit*, ...) and "
        "CNNs with features (convnext*, resnet*, efficientnet*, ...)"
    )


def hf_architecture(
    repo: str, weights: str | None, revision: str | None, trust_remote_code: bool
) -> Architecture:
    """A transformers model's config.json (vision_config for CLIP/SigLIP-style models): ViT-style models only."""
    from transformers import AutoConfig

    local = weights not in (None, "pretrained", "random")
    source = str(Path(weights).expanduser()) if local else repo
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    if local or offline():
        kwargs["local_files_only"] = True
    if local and not (Path(source) / "config.json").is_file():
        what = "is not a folder" if not Path(source).is_dir() else "has no config.json"
        raise ConfigError(
            f"encoder 'hf:{repo}': weights: {source} {what}; set weights: to a save_pretrained folder of "
            f"{repo} (config.json and the weights), or to pretrained to read the Hugging Face cache"
        )
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except OSError as e:
        where = source if local else f"the Hugging Face cache {hf_cache_dir()} (repo {repo})"
        raise ConfigError(
            f"encoder 'hf:{repo}': no config.json found in {where} ({str(e).splitlines()[0][:160]}); download it "
            f"with `hf download {repo}` on a machine with internet, or set weights: to a "
            "save_pretrained folder"
        ) from None
    vision = getattr(config, "vision_config", None) or config
    patch = getattr(vision, "patch_size", None)
    if not isinstance(patch, int) or not hasattr(vision, "hidden_size"):
        raise ConfigError(
            f"encoder 'hf:{repo}': a '{config.model_type}' model (no integer patch_size / hidden_size in its "
            "config); from transformers reconlab reads ViT-style models (CLIP, SigLIP, DINOv2, ViT, ...): "
            "take CNNs from timm ('timm:<id>')"
        )
    n = int(vision.num_hidden_layers)
    size = getattr(vision, "image_size", 224)
    resolution = int(size[0] if isinstance(size, (tuple, list)) else size)
    return Architecture("vit", n, (patch,) * n, (int(vision.hidden_size),) * n, resolution)


def architecture(spec: EncoderSpec) -> Architecture:
    if spec.backend == "timm":
        return timm_architecture(spec.model_id, spec.model_kwargs)
    return hf_architecture(spec.model_id, spec.weights, spec.revision, spec.trust_remote_code)


def _name_of(model_id: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._+-]+", "-", model_id.rsplit("/", 1)[-1]).strip(".-")
    return name[:64]


def spec_from_id(entry: EncoderEntry) -> EncoderSpec:
    """The spec of a model given as 'timm:<id>' or 'hf:<repo>' (without layer expansion)."""
    backend, _, model_id = entry.encoder.partition(":")
    if not model_id:
        raise ConfigError(f"encoder '{entry.encoder}': give a model id after '{backend}:'")
    backend = {"timm": "timm", "hf": "transformers"}[backend]
    if backend == "timm":
        arch = timm_architecture(model_id, entry.model_kwargs)
    else:
        arch = hf_architecture(model_id, entry.weights, entry.revision, bool(entry.trust_remote_code))
    layer = entry.layer if entry.layer is not None else -1 if arch.family == "cnn" else -2
    resolution = entry.resolution or arch.resolution
    fields = {
        "name": entry.name or _name_of(model_id),
        "backend": backend,
        "model_id": model_id,
        "resolution": resolution,
        "patch_size": arch.strides[arch.layer_index(layer)],
        "feature_layer": layer,
        "hidden_dim": None if layer == "last" else arch.widths[arch.layer_index(layer)],
        "preprocessing_source": "timm_pretrained_cfg" if backend == "timm" else "hf_image_processor",
    }
    for option in ("weights", "revision", "seed", "trust_remote_code", "model_kwargs"):
        if getattr(entry, option) is not None:
            fields[option] = getattr(entry, option)
    return _checked(EncoderSpec, fields, entry.encoder)


def _checked(model, fields: dict, what: str):
    from pydantic import ValidationError

    try:
        return model(**fields)
    except ValidationError as e:
        raise ConfigError(f"encoder '{what}': {e.errors()[0]['msg']}") from None


def layer_specs(base: EncoderSpec, entry: EncoderEntry) -> list[EncoderSpec]:
    """One spec per requested layer of `base`, named NAME.L-1, NAME.L-2, ... (NAME.last); the patch size (a
    CNN's stride) and width follow the layer. The layer `base` itself reads is `base`, under its own name: the
    same store, encoded and trained once."""
    if entry.layers is None and entry.every is None and (entry.layer is None or entry.by_id):
        return [base]
    needs_arch = entry.every is not None or base.backend == "timm"  # a timm model may be a CNN
    arch = architecture(base) if needs_arch else None
    if entry.every is not None:
        layers: list[Layer] = list(range(-1, -arch.n_layers - 1, -entry.every))
    else:
        layers = entry.layers or [entry.layer]
    specs = []
    for layer in layers:
        if layer == base.feature_layer:
            specs.append(base)
            continue
        suffix = "last" if layer == "last" else f"L{layer}"
        fields = {**base.model_dump(), "feature_layer": layer, "name": f"{base.name}.{suffix}"[:64]}
        if arch is not None:
            if layer != "last" and -layer > arch.n_layers:
                raise ConfigError(
                    f"encoder '{base.name}': layer {layer} does not exist; the model has {arch.n_layers} "
                    f"{'stages' if arch.family == 'cnn' else 'blocks'} (-1 .. -{arch.n_layers})"
                )
            if arch.family == "cnn":  # 'last' may end in a head conv of another width: the probe measures it
                i = arch.layer_index(layer)
                fields |= {
                    "patch_size": arch.strides[i],
                    "hidden_dim": None if layer == "last" else arch.widths[i],
                }
        specs.append(_checked(EncoderSpec, fields, f"{base.name} layer {layer}"))
    return specs


# Keyword args that would rebuild a trained network with another activation or normalisation.
_ARCHITECTURE_KWARGS = {"act_layer", "norm_layer", "hidden_act", "layer_norm_eps", "norm_eps"}


def check_layer_and_width(spec: EncoderSpec) -> None:
    """A timm spec's feature_layer exists, its patch_size is that layer's patch or stride, its hidden_dim that
    layer's width and its n_prefix_tokens the model's, read from the network built on the meta device (no
    weights): a wrong one failed mid-encode, after the stores before it (a wrong patch_size as "the model returns
    -47 prefix tokens")."""
    if spec.backend != "timm":
        return
    try:
        arch = architecture(spec)
    except ConfigError:  # a model timm does not know: the loader says where it looked
        return
    unit = "stages" if arch.family == "cnn" else "blocks"
    if spec.feature_layer != "last" and -spec.feature_layer > arch.n_layers:
        raise ConfigError(
            f"encoder '{spec.name}': feature_layer {spec.feature_layer} does not exist; the model has "
            f"{arch.n_layers} {unit} (-1 .. -{arch.n_layers}); fix feature_layer in its YAML"
        )
    stride = arch.strides[arch.layer_index(spec.feature_layer)]
    if spec.patch_size != stride:
        raise ConfigError(
            f"encoder '{spec.name}': patch_size {spec.patch_size}, but layer {spec.feature_layer} of "
            f"'{spec.model_id}' has {'a stride' if arch.family == 'cnn' else 'patches'} of {stride} px; fix "
            "patch_size in its YAML"
        )
    if (
        None not in (spec.n_prefix_tokens, arch.n_prefix_tokens)
        and spec.n_prefix_tokens != arch.n_prefix_tokens
    ):
        raise ConfigError(
            f"encoder '{spec.name}': n_prefix_tokens {spec.n_prefix_tokens}, but '{spec.model_id}' puts "
            f"{arch.n_prefix_tokens} before its patch tokens; fix n_prefix_tokens in its YAML (or leave it out)"
        )
    if spec.feature_layer == "last":
        return
    width = arch.widths[arch.layer_index(spec.feature_layer)]
    if spec.hidden_dim is not None and spec.hidden_dim != width:
        raise ConfigError(
            f"encoder '{spec.name}': hidden_dim {spec.hidden_dim}, but layer {spec.feature_layer} of "
            f"'{spec.model_id}' is {width} wide; fix hidden_dim in its YAML (or leave it out: it is measured)"
        )


def feature_width(spec: EncoderSpec) -> int | None:
    """The stored features' width D: the spec's, or its timm network's at the layer (None where not known
    without loading more)."""
    if spec.hidden_dim is not None or spec.backend != "timm":
        return spec.hidden_dim
    try:
        arch = architecture(spec)
    except ConfigError:
        return None
    return arch.widths[arch.layer_index(spec.feature_layer)]


def check_architecture(spec: EncoderSpec) -> None:
    """Refuse a spec whose network differs from the one its weights were trained with (before any download).

    timm marks weights trained with QuickGELU ('natively QuickGELU, use quickgelu model variant') whose default
    architecture uses exact GELU: the plain id loads those weights into the wrong network without complaint.
    """
    if spec.weights == "random":
        return
    overridden = sorted(_ARCHITECTURE_KWARGS & set(spec.model_kwargs))
    if overridden:
        raise ArchitectureMismatchError(
            f"encoder '{spec.name}': model_kwargs {overridden} change the architecture its weights were trained "
            "with; remove them (or use weights: random)"
        )
    if spec.backend != "timm":
        return  # transformers builds the architecture from the config.json shipped with the weights
    _torchvision_shim.install()
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(spec.model_id)
    except Exception:  # an id timm does not know: the loader reports it with where it looked
        return
    notes = " ".join(getattr(cfg, "notes", None) or ())
    arch, _, tag = spec.model_id.partition(".")
    if "quickgelu" in notes.lower() and "quickgelu" not in arch:
        fixed = arch.replace("_clip_", "_clip_quickgelu_") + (f".{tag}" if tag else "")
        raise ArchitectureMismatchError(
            f"encoder '{spec.name}': timm model '{spec.model_id}' uses exact GELU but its weights were trained with "
            f"QuickGELU (timm: '{notes}'); set model_id: {fixed}"
        )


class ArchitectureMismatchError(ValueError):
    """A spec that would load weights into a network other than the one they were trained with."""
