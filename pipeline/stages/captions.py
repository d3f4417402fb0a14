"""Text-encode stage: a split's captions through the encoder's text tower (transformers CLIP/SigLIP with
keep_head: true), into a caption store beside the feature stores: `text_embeddings` [M, E] float32 (the same
projected space as a feature store's `embeddings`), `caption_image_ids` [M] int64 (the image each caption
describes: the image-caption pairs of the Bridge Score), `chunk_done` [C], and `captions.json` (the strings, in
order). Written chunk by chunk: a killed run resumes at the first chunk not done; `result.json` marks it finished.

Folder: `{encoder}__{dataset}-{split}__captions__{hash}.zarr`, the hash of the dataset's image list, the encoder
spec, its weights and its tokenizer files.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from pipeline import artifacts, bars
from pipeline.artifacts import WriteLock
from pipeline.config import DatasetSpec, EncoderSpec, SubsetSpec
from pipeline.data.datasets import image_list_sha256, list_images
from pipeline.models import text_towers
from pipeline.models.encoders import resolve_device
from pipeline.models.weights import weights_key

CHUNK = 1024  # captions per chunk: the unit of resumable work


@dataclass(frozen=True)
class CaptionJob:
    store_root: Path
    dataset: DatasetSpec
    split: str
    subset: SubsetSpec
    encoder: EncoderSpec
    batch_size: int = 256
    device: str = "auto"


@dataclass(frozen=True)
class CaptionResult:
    path: Path
    n_captions: int
    already_complete: bool


def plan(job: CaptionJob) -> tuple[list[tuple[int, str]], dict, Path]:
    """(image id, caption) pairs in dataset order, the key, and the folder, without loading a model."""
    records = list_images(job.dataset, job.split, job.subset)
    pairs = [(r.image_id, caption) for r in records for caption in r.captions]
    key = {"dataset": {"name": job.dataset.name, "kind": job.dataset.kind, "split": job.split},
           "subset": job.subset.model_dump(mode="json"), "image_list_sha256": image_list_sha256(records),
           "encoder": job.encoder.model_dump(mode="json", exclude={"name"}), "weights": weights_key(job.encoder),
           "tokenizer": text_towers.tokenizer_id(job.encoder)}  # fmt: skip
    label = f"{job.encoder.name}__{job.dataset.name}-{job.split}__captions"
    return pairs, key, artifacts.folder(job.store_root, label, key, ".zarr")


def run(job: CaptionJob, *, progress: bool = False) -> CaptionResult:
    text_towers.check_has_text_tower(job.encoder, "captions")
    pairs, key, path = plan(job)
    if not pairs:
        raise ValueError(f"split '{job.split}' of dataset '{job.dataset.name}' has no captions to encode")
    if artifacts.finished(path / artifacts.RESULT) is not None:
        return CaptionResult(path, len(pairs), already_complete=True)
    tower = text_towers.load(job.encoder, resolve_device(job.device))
    with WriteLock(path):
        group = _open_or_create(path, pairs, tower)
        done = group["chunk_done"][:]
        bar = bars.bar(total=len(pairs), initial=int(done.sum()) * CHUNK, disable=not progress, unit="caption",
                   desc=f"captions {path.name[:50]}")  # fmt: skip
        for chunk in np.flatnonzero(~done):
            rows = slice(chunk * CHUNK, min((chunk + 1) * CHUNK, len(pairs)))
            texts = [caption for _, caption in pairs[rows]]
            embedded = np.concatenate([tower.embed(texts[i : i + job.batch_size])
                                       for i in range(0, len(texts), job.batch_size)])  # fmt: skip
            group["text_embeddings"][rows] = embedded
            group["caption_image_ids"][rows] = [image_id for image_id, _ in pairs[rows]]
            group["chunk_done"][chunk] = True
            bar.update(rows.stop - rows.start)
        bar.close()
        artifacts.finish(path / artifacts.RESULT, key, {"n_captions": len(pairs)})
    return CaptionResult(path, len(pairs), already_complete=False)


def _open_or_create(path: Path, pairs: list[tuple[int, str]], tower) -> zarr.Group:
    if (path / "zarr.json").is_file():
        return zarr.open_group(str(path), mode="r+", zarr_format=3)
    width = tower.embed(["a photo"]).shape[-1]
    building = path.with_name(f".{path.name}.creating")
    shutil.rmtree(building, ignore_errors=True)
    group = zarr.open_group(str(building), mode="w-", zarr_format=3)
    m = len(pairs)
    group.create_array("text_embeddings", shape=(m, width), dtype="float32", chunks=(CHUNK, width),
                       fill_value=0, dimension_names=("caption", "e"))  # fmt: skip
    group.create_array("caption_image_ids", shape=(m,), dtype="int64", chunks=(CHUNK,), fill_value=0,
                       dimension_names=("caption",))  # fmt: skip
    group.create_array("chunk_done", shape=(-(-m // CHUNK),), dtype="bool", chunks=(1,), fill_value=False,
                       dimension_names=("chunk",))  # fmt: skip
    group.attrs.update({"encoder": tower.spec.name, "n_captions": m, "embedding_dim": int(width)})
    (building / "captions.json").write_text(json.dumps([caption for _, caption in pairs]))
    building.rename(path)
    return zarr.open_group(str(path), mode="r+", zarr_format=3)
