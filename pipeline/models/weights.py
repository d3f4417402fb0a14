"""Where an encoder's weights come from and what identifies them: the Hugging Face cache, local files, or a seeded
random init. Missing weights fail before any work, with where we looked and how to provide them."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

from pipeline.config import EncoderSpec
from pipeline.models import _torchvision_shim
from pipeline.provenance import file_sha256

TIMM_WEIGHT_FILES = (
    "model.safetensors",
    "open_clip_model.safetensors",
    "pytorch_model.bin",
    "open_clip_pytorch_model.bin",
)


class WeightsNotFoundError(FileNotFoundError):
    """The encoder's weights are not on this machine; the message says where we looked and how to fix it."""


class WeightsMismatchError(Exception):
    """The weights are there but do not load into the spec's model: a damaged file, another architecture, other
    sizes. The message names the weights, the model and the first thing that failed."""


def weights_mismatch(spec: EncoderSpec, error: Exception) -> WeightsMismatchError:
    where = "the Hugging Face cache" if spec.weights == "pretrained" else f"'{spec.weights}'"
    detail = " ".join(str(error).split())  # state-dict errors run over many lines
    detail = detail if len(detail) <= 300 else detail[:297] + "..."
    return WeightsMismatchError(
        f"encoder '{spec.name}': the weights in {where} do not load into {spec.backend} model '{spec.model_id}' "
        f"({type(error).__name__}: {detail}); point `weights:` at an intact checkpoint of this model, or set "
        "model_id / model_kwargs to the model the checkpoint is for"
    )


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def offline() -> bool:
    from huggingface_hub import constants

    # huggingface_hub reads the variable once at import; a later export (a notebook, a test) must count too.
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0").lower() in (
        "1",
        "true",
        "yes",
        "on",
    )


def missing_weights(spec: EncoderSpec, looked: str, cause: Exception | None) -> WeightsNotFoundError:
    hub_id = spec.model_id if spec.backend == "transformers" else f"timm/{spec.model_id}"
    msg = (
        f"weights for encoder '{spec.name}' ({spec.backend} model '{spec.model_id}') not found.\n"
        f"  looked in: {looked}\n"
        f"  HF_HUB_OFFLINE={'1' if offline() else '0'}\n"
        f"  to provide them: on a machine with internet run `hf download {hub_id}` and copy the "
        f"cache folder to {hf_cache_dir()} (or set HF_HOME / HF_HUB_CACHE), or set `weights:` in the spec of "
        f"'{spec.name}' (its YAML file, or its entry in the run config) to a local checkpoint file or "
        "save_pretrained folder."
    )
    if cause is not None:
        msg += f"\n  cause: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
    return WeightsNotFoundError(msg)


@contextlib.contextmanager
def timm_missing_keys():
    """The weights a checkpoint lacked. timm loads non-strictly whenever it drops the classifier (num_classes=0,
    as here) and only logs, at INFO, the model's keys the checkpoint did not have: those layers keep their random
    init, so a checkpoint of another model would load "successfully". Records below the level the logger had
    are dropped here as before."""
    logger = logging.getLogger("timm.models._builder")
    level, shown_from = logger.level, logger.getEffectiveLevel()
    missing: list[str] = []

    def catch(record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Missing keys ("):
            missing.extend(record.getMessage().removeprefix("Missing keys (").split(")", 1)[0].split(", "))
        if missing and record.getMessage().startswith("Unexpected keys ("):
            return False  # the refusal says it in one line
        return record.levelno >= shown_from

    logger.addFilter(catch)
    logger.setLevel(min(shown_from, logging.INFO))
    try:
        yield missing
    finally:
        logger.removeFilter(catch)
        logger.setLevel(level)


def refuse_partial_load(spec: EncoderSpec, missing: list) -> None:
    if missing:
        first = ", ".join(map(str, missing[:3]))
        raise weights_mismatch(spec, LookupError(f"the checkpoint lacks {len(missing)} of the model's weights "
                                                 f"({first}, ...), which would keep their random init"))  # fmt: skip


@functools.lru_cache(maxsize=64)
def file_sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(Path(path))


def weights_key(spec: EncoderSpec) -> str:
    """Which weights a spec resolves to, cheaply and without building the model: part of every store key, so a
    changed checkpoint file or a new cached revision can never reuse stores made with the old weights."""
    if spec.weights == "random":
        return f"random seed={spec.seed}"
    if spec.weights == "pretrained":
        if spec.backend == "timm":
            _torchvision_shim.install()  # before importing timm
            import timm

            repo = getattr(timm.models.get_pretrained_cfg(spec.model_id), "hf_hub_id", None)
            files, ref = TIMM_WEIGHT_FILES, None
        else:
            repo, files, ref = spec.model_id, ("config.json",), spec.revision
        # The commit the weights resolve to, whether or not they are downloaded yet: the cache's snapshot folder
        # is named by that commit, and the hub reports the same commit before the first download. So a first
        # encode and every later one share a key ('unresolved' only offline with nothing cached, where loading
        # the weights fails before any store is written).
        revision = (cached_revision(repo, files, ref) or hub_revision(repo, ref)) if repo else None
        return f"hf:{repo}@{revision or 'unresolved'}"
    path = Path(spec.weights).expanduser()
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.glob("*") if p.suffix in (".safetensors", ".bin", ".pth"))
    )
    return (
        ",".join(
            f"{f.name}:{file_sha256_cached(str(f), f.stat().st_size, f.stat().st_mtime_ns)}" for f in files
        )
        or f"missing:{path}"
    )


def check_available(spec: EncoderSpec) -> None:
    """Raise WeightsNotFoundError now, before any work, if loading `spec` would fail for want of its weights."""
    if spec.weights == "random":
        return
    if spec.weights == "pretrained":
        if weights_key(spec).endswith("@unresolved"):
            why = (
                "offline (HF_HUB_OFFLINE) and not in the cache"
                if offline()
                else "not in the cache, hub unreachable"
            )
            raise missing_weights(spec, f"{hf_cache_dir()} ({why})", None)
        return
    path = Path(spec.weights).expanduser()
    if not path.exists():
        raise missing_weights(spec, str(path), None)


def state_dict_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def hub_revision(repo_id: str, revision: str | None) -> str | None:
    """The commit `revision` (default branch if None) of a hub repo points to, asked of the hub; None offline."""
    if offline():
        return None
    from huggingface_hub import HfApi

    try:
        return HfApi().model_info(repo_id, revision=revision).sha
    except Exception:  # unreachable hub, unknown repo: the loader reports where it looked
        return None


def cached_revision(repo_id: str, filenames: tuple[str, ...], revision: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        found = try_to_load_from_cache(repo_id, name, revision=revision)
        if isinstance(found, str):
            parts = Path(found).parts
            return parts[parts.index("snapshots") + 1] if "snapshots" in parts else found
    return None
