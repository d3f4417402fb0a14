"""The model of an encoder spec with its weights (timm or transformers), the preprocessing its own config gives,
and the identity of the weights it loaded. Weights that do not fit the model are refused, not half-loaded."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import EncoderSpec
from pipeline.data.images import Preprocessing
from pipeline.models import model_ids
from pipeline.models.preprocessing_sources import from_hf_processor, from_timm_config
from pipeline.models.weights import (
    TIMM_WEIGHT_FILES,
    cached_revision,
    hf_cache_dir,
    missing_weights,
    offline,
    refuse_partial_load,
    state_dict_sha256,
    timm_missing_keys,
)
from pipeline.provenance import file_sha256


def load_timm(spec: EncoderSpec) -> tuple[torch.nn.Module, Preprocessing, str]:
    import timm

    kwargs = {"img_size": spec.resolution, "num_classes": 0, **spec.model_kwargs}
    if spec.model_id.startswith("samvit") or spec.keep_head:
        kwargs.pop("num_classes")
    if model_ids.timm_architecture(spec.model_id, spec.model_kwargs).family == "cnn":
        kwargs.pop("img_size")  # a CNN takes any input size
    if spec.weights == "random":
        torch.manual_seed(spec.seed)
        model = timm.create_model(spec.model_id, pretrained=False, **kwargs)
        weights_id = f"random-init seed={spec.seed} sha256={state_dict_sha256(model)}"
    elif spec.weights == "pretrained":
        hf_hub_id = getattr(timm.models.get_pretrained_cfg(spec.model_id), "hf_hub_id", None)
        revision = cached_revision(hf_hub_id, TIMM_WEIGHT_FILES, None) if hf_hub_id else None
        looked = (
            f"Hugging Face cache {hf_cache_dir()} (repo {hf_hub_id}, files {', '.join(TIMM_WEIGHT_FILES)})"
        )
        if revision is None and offline():
            raise missing_weights(spec, looked, None)
        try:
            with timm_missing_keys() as missing:
                model = timm.create_model(spec.model_id, pretrained=True, **kwargs)
        except Exception as e:  # timm surfaces hub misses as several error types
            raise missing_weights(spec, looked, e) from e
        refuse_partial_load(spec, missing)
        revision = revision or cached_revision(hf_hub_id, TIMM_WEIGHT_FILES, None)
        weights_id = f"hf:{hf_hub_id}@{revision or 'unknown'}"
    else:
        path = Path(spec.weights).expanduser()
        weight_file = path
        if path.is_dir():
            weight_file = next((path / f for f in TIMM_WEIGHT_FILES if (path / f).is_file()), path / "?")
        if not weight_file.is_file():
            raise missing_weights(spec, f"{path} (a file, or a folder with one of {TIMM_WEIGHT_FILES})", None)
        with timm_missing_keys() as missing:
            model = timm.create_model(
                spec.model_id, pretrained=True, pretrained_cfg_overlay={"file": str(weight_file)}, **kwargs
            )
        refuse_partial_load(spec, missing)
        weights_id = f"file:{weight_file.name} sha256={file_sha256(weight_file)}"
    preprocessing = from_timm_config(spec, timm.data.resolve_model_data_config(model))
    return model, preprocessing, weights_id


def load_transformers(spec: EncoderSpec) -> tuple[torch.nn.Module, Preprocessing, str]:
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    local = spec.weights not in ("pretrained", "random")
    source = str(Path(spec.weights).expanduser()) if local else spec.model_id
    common = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    if local:
        if not (Path(source) / "config.json").is_file():
            raise missing_weights(
                spec, f"{source} (expected a save_pretrained folder with config.json)", None
            )
        common["local_files_only"] = True
    elif offline():
        common["local_files_only"] = True
        if cached_revision(source, ("config.json",), spec.revision) is None:
            raise missing_weights(spec, f"Hugging Face cache {hf_cache_dir()} (repo {source})", None)
    try:
        if spec.weights == "random":
            config = AutoConfig.from_pretrained(source, **common)
            torch.manual_seed(spec.seed)
            model = AutoModel.from_config(config, trust_remote_code=spec.trust_remote_code)
        else:
            model, loading = AutoModel.from_pretrained(source, output_loading_info=True, **common)
            refuse_partial_load(spec, [*loading["missing_keys"], *loading.get("mismatched_keys", [])])
        processor = AutoImageProcessor.from_pretrained(source, **common)
    except OSError as e:
        looked = source if local else f"Hugging Face cache {hf_cache_dir()} (repo {source})"
        raise missing_weights(spec, looked, e) from e
    if not spec.keep_head:
        model = getattr(model, "vision_model", model)  # CLIPModel / SiglipModel -> their vision tower
    if spec.weights == "random":
        weights_id = f"random-init seed={spec.seed} sha256={state_dict_sha256(model)}"
    elif local:
        files = sorted(Path(source).glob("*.safetensors")) or sorted(Path(source).glob("*.bin"))
        weights_id = "dir:" + ",".join(f"{f.name} sha256={file_sha256(f)}" for f in files)
    else:
        # The snapshot folder's name: transformers 5 no longer sets config._commit_hash.
        revision = cached_revision(source, ("config.json",), spec.revision)
        weights_id = f"hf:{source}@{revision or spec.revision or 'unknown'}"
    return model, from_hf_processor(spec, processor), weights_id
