"""The text side of a vision-language encoder (transformers `CLIPModel` / `SiglipModel` with keep_head: true):
caption embeddings in the same projected space as the image embeddings `Encoder.embed` returns, and the identity
of the tokenizer (part of the caption artifact's key). Loaded from the same source as the image side: a
save_pretrained folder (`weights: PATH`) or the Hugging Face cache (offline: never downloaded here)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import ConfigError, EncoderSpec
from pipeline.models import _torchvision_shim
from pipeline.models.weights import cached_revision, hf_cache_dir, missing_weights, offline

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "spiece.model")  # fmt: skip


def check_has_text_tower(spec: EncoderSpec, field: str) -> None:
    if spec.backend != "transformers" or not spec.keep_head:
        raise ConfigError(f"{field}: encoder '{spec.name}' has no text tower here: caption embeddings need a "
                          "transformers CLIP/SigLIP model (backend: transformers) with keep_head: true")  # fmt: skip


def _source(spec: EncoderSpec) -> tuple[str, dict]:
    local = spec.weights not in ("pretrained", "random")
    source = str(Path(spec.weights).expanduser()) if local else spec.model_id
    common = {"revision": spec.revision}
    if local or offline():
        common["local_files_only"] = True
    if not local and offline() and cached_revision(source, ("config.json",), spec.revision) is None:
        raise missing_weights(spec, f"Hugging Face cache {hf_cache_dir()} (repo {source})", None)
    return source, common


def tokenizer_id(spec: EncoderSpec) -> str:
    """The tokenizer's identity: its files' SHA-256 for a local folder, the model's revision otherwise."""
    source, _ = _source(spec)
    folder = Path(source)
    if folder.is_dir():
        digest = hashlib.sha256()
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                digest.update(name.encode() + (folder / name).read_bytes())
        return f"dir:{digest.hexdigest()}"
    return f"hf:{source}@{spec.revision or 'default'}"


@dataclass
class TextTower:
    spec: EncoderSpec
    model: torch.nn.Module
    tokenizer: object
    device: torch.device

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        """Captions -> projected text embeddings [M, E], float32."""
        max_length = getattr(self.model.config.text_config, "max_position_embeddings", 77)
        batch = self.tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                               return_tensors="pt").to(self.device)  # fmt: skip
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        out = self.model.get_text_features(**inputs)
        return getattr(out, "pooler_output", out).float().cpu().numpy()


def load(spec: EncoderSpec, device: str | torch.device = "cpu") -> TextTower:
    """The encoder's text tower and tokenizer; a missing model or tokenizer fails before any work, saying where it
    looked and how to provide it."""
    _torchvision_shim.install()  # before transformers imports torchvision
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    check_has_text_tower(spec, "text tower")
    source, common = _source(spec)
    looked = source if Path(source).is_dir() else f"Hugging Face cache {hf_cache_dir()} (repo {source})"
    try:
        if spec.weights == "random":
            torch.manual_seed(spec.seed)
            model = AutoModel.from_config(AutoConfig.from_pretrained(source, **common))
        else:
            model = AutoModel.from_pretrained(source, **common)
    except OSError as e:
        raise missing_weights(spec, looked, e) from e
    if not hasattr(model, "get_text_features"):
        raise ConfigError(
            f"encoder '{spec.name}': {type(model).__name__} has no text tower (get_text_features)"
        )
    no_files = f"{looked}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...)"
    if Path(source).is_dir() and not any((Path(source) / name).is_file() for name in TOKENIZER_FILES):
        # transformers would build an empty tokenizer from config.json alone and embed every caption alike
        raise missing_weights(spec, no_files, None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
    except (OSError, ValueError) as e:
        raise missing_weights(spec, no_files, e) from e
    if len(tokenizer) <= 16:
        raise missing_weights(
            spec, f"{looked}: its tokenizer has {len(tokenizer)} tokens (files empty?)", None
        )
    device = torch.device(device)
    return TextTower(spec, model.to(device).eval(), tokenizer, device)
