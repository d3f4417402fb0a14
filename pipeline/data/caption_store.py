"""A finished caption store (written by the text-encode stage, pipeline/stages/captions.py) read as data."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from pipeline.artifacts import finished


@dataclass(frozen=True)
class Captions:
    path: Path
    embeddings: np.ndarray  # text_embeddings [M, E]
    image_ids: np.ndarray  # caption_image_ids [M]: the image each caption describes
    texts: list[str]
    digest: dict  # how a downstream artifact names what it read


def digest(path: Path) -> dict:
    """How a downstream artifact names a caption store: its key's hash (from its result record alone)."""
    record = finished(Path(path) / "result.json")
    if record is None:
        raise ValueError(f"{path}: not a finished caption store (run the text-encode stage to finish it)")
    return {"config_hash": record["config_hash"]}


def read(path: Path) -> Captions:
    key = digest(path)
    group = zarr.open_group(str(path), mode="r")
    texts = json.loads((Path(path) / "captions.json").read_text())
    return Captions(Path(path), group["text_embeddings"][:], group["caption_image_ids"][:], texts, key)
