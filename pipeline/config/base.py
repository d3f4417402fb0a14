"""What every config shares: frozen models that forbid unknown keys, the Runtime marker (fields left out of every
artifact's identity), folder-safe names, and the canonical hash of a config."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


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
# NumPy's generators refuse negative seeds; torch keeps 64 bits
Seed = Annotated[int, Field(ge=0, lt=2**63)]

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


def canonical_json(obj: Any) -> str:
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(obj: Any, n_chars: int = 16) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:n_chars]
