"""Image lists for a dataset split: COCO (pycocotools), a plain folder, or the embedded demo.

Images come in a deterministic order (sorted by image id); a subset is the first `max_images` or a seeded
random choice. Captions ride along when the annotations have them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data import demo
from pipeline.config import ConfigError, DatasetSpec, SplitSpec, SubsetSpec


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    path: Path
    captions: tuple[str, ...] = ()


def demo_splits(root: Path) -> dict[str, SplitSpec]:
    return {
        split: SplitSpec(images_dir=root / split, annotations=root / "annotations" / f"captions_{split}.json")
        for split in ("train", "val")
    }


def split_spec(dataset: DatasetSpec, split: str) -> SplitSpec:
    splits = demo_splits(dataset.root) if dataset.kind == "demo" else dataset.splits
    if split not in splits:
        raise ConfigError(f"dataset '{dataset.name}' has no split '{split}'; it has {sorted(splits)}")
    spec = splits[split]
    if dataset.kind == "demo":
        return spec

    def under_root(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else dataset.root / p

    return SplitSpec(images_dir=under_root(spec.images_dir), annotations=under_root(spec.annotations))


def list_images(dataset: DatasetSpec, split: str, subset: SubsetSpec = SubsetSpec()) -> list[ImageRecord]:
    """The split's images, sorted by id, reduced to the subset."""
    if dataset.kind == "demo":
        demo.build(dataset.root)
    spec = split_spec(dataset, split)
    if dataset.kind == "folder":
        records = _folder_records(spec.images_dir)
    else:
        records = _coco_records(spec)
    records.sort(key=lambda r: r.image_id)
    return select_subset(records, subset)


def select_subset(records: list[ImageRecord], subset: SubsetSpec) -> list[ImageRecord]:
    if subset.max_images is None or subset.max_images >= len(records):
        return records
    if subset.seed is None:
        return records[: subset.max_images]
    chosen = np.random.default_rng(subset.seed).choice(len(records), size=subset.max_images, replace=False)
    return [records[i] for i in sorted(chosen)]


def _coco_records(spec: SplitSpec) -> list[ImageRecord]:
    from pycocotools.coco import COCO

    if not spec.annotations.is_file():
        raise ConfigError(f"annotations file not found: {spec.annotations}")
    if not spec.images_dir.is_dir():
        raise ConfigError(f"images folder not found: {spec.images_dir}")
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress to stdout
        coco = COCO(str(spec.annotations))
    records = []
    for image_id, info in coco.imgs.items():
        captions = tuple(a["caption"] for a in coco.imgToAnns.get(image_id, []) if "caption" in a)
        records.append(ImageRecord(int(image_id), spec.images_dir / info["file_name"], captions))
    return records


def _folder_records(images_dir: Path) -> list[ImageRecord]:
    if not images_dir.is_dir():
        raise ConfigError(f"images folder not found: {images_dir}")
    records = []
    for path in sorted(p for p in images_dir.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = f"{images_dir.name}/{path.relative_to(images_dir).as_posix()}"
        # A stable id from the split folder's name and the relative path: the same file keeps its id across
        # runs and subsets, and train/0001.jpg and val/0001.jpg do not collide.
        image_id = int(hashlib.sha1(rel.encode()).hexdigest()[:15], 16)
        records.append(ImageRecord(image_id, path))
    return records


def image_list_sha256(records: list[ImageRecord]) -> str:
    """Identity of an image list (ids + file names) for content-addressed store keys."""
    digest = hashlib.sha256()
    for r in records:
        digest.update(f"{r.image_id}\t{r.path.name}\n".encode())
    return digest.hexdigest()[:16]
