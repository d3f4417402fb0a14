"""Image lists for a dataset split: COCO (pycocotools), a plain folder, or the embedded demo.

Images come in a deterministic order (sorted by image id); a subset is the first `max_images` or a seeded
random choice. Captions ride along when the annotations have them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import ConfigError, DatasetSpec, SplitSpec, SubsetSpec
from pipeline.data import demo


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    path: Path
    captions: tuple[str, ...] = ()
    refused: str = ""  # why it must not be read (recorded as a failure), e.g. a path out of its folder


def demo_splits(root: Path) -> dict[str, SplitSpec]:
    return {
        split: SplitSpec(images_dir=root / split, annotations=root / "annotations" / f"captions_{split}.json")
        for split in ("train", "val")
    }


def split_spec(dataset: DatasetSpec, split: str) -> SplitSpec:
    splits = demo_splits(dataset.root) if dataset.kind == "demo" else dataset.splits
    if split not in splits:
        raise ConfigError(
            f"dataset '{dataset.name}' has no split '{split}'; it has {sorted(splits)}: add it to dataset.splits, "
            "or name one it has where the split comes from (splits, train.train_split / val_split, "
            "operators.split, evaluate.split; train_split defaults to 'train', the others to 'val')"
        )
    spec = splits[split]
    if dataset.kind == "demo":
        return spec

    def under_root(p: Path | None) -> Path | None:
        if p is None or p.is_absolute():
            return p
        if not Path(dataset.root).is_dir():
            raise ConfigError(f"dataset.root {dataset.root} (dataset '{dataset.name}') is not a folder here; point "
                              f"it at the dataset (split '{split}' names {p} relative to it)")  # fmt: skip
        return dataset.root / p

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
    if not records:
        source = spec.images_dir if dataset.kind == "folder" else spec.annotations
        raise ConfigError(f"dataset '{dataset.name}' split '{split}' has no images ({source} lists none)")
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
    if not spec.annotations.is_file():
        raise ConfigError(f"annotations file not found: {spec.annotations} (dataset.splits: annotations)")
    if not spec.images_dir.is_dir():
        raise ConfigError(f"images folder not found: {spec.images_dir} (dataset.splits: images_dir)")
    # A plan lists each split once per encoder and the held-out checks list it again: COCO's train annotations
    # take seconds to parse, so a file is parsed once while it is unchanged.
    st = spec.annotations.stat()
    key = (
        str(spec.annotations.resolve()),
        str(spec.images_dir.resolve()),
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
    )
    if key not in _coco_listings:
        _coco_listings[key] = _parse_coco(spec)
    return list(_coco_listings[key])


_coco_listings: dict[tuple, list[ImageRecord]] = {}


def _parse_coco(spec: SplitSpec) -> list[ImageRecord]:
    import pycocotools.coco as coco_module
    from pycocotools.coco import COCO

    coco = COCO()  # built from the checked dict: pycocotools trusts the file's shape and fails deep inside
    coco.dataset = read_coco_annotations(spec.annotations)
    # createIndex() prints progress; a flow with log_prints turns print() itself into log records, so shadow
    # the module's print rather than redirect stdout.
    coco_module.print = lambda *args, **kwargs: None
    try:
        coco.createIndex()
    finally:
        del coco_module.print
    images_dir = spec.images_dir.resolve()
    records = []
    for image_id, info in coco.imgs.items():
        captions = tuple(a["caption"] for a in coco.imgToAnns.get(image_id, []) if "caption" in a)
        path = spec.images_dir / info["file_name"]
        # A file name that leads out of the images folder (../x.jpg, an absolute path, a symlink out) is refused.
        outside = Path(info["file_name"]).is_absolute() or not path.resolve().is_relative_to(images_dir)
        refused = (
            f"file_name {info['file_name']!r} leads outside the images folder {spec.images_dir}"
            if outside
            else ""
        )
        records.append(ImageRecord(int(image_id), path, captions, refused))
    return records


def read_coco_annotations(path: Path) -> dict:
    """A COCO-format annotation file, checked and normalised; ConfigError naming the file and what is wrong."""
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the annotations file: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a COCO object with an 'images' list, got a JSON {type(data).__name__}"
        )
    images = data.get("images")
    if images is None:
        raise ConfigError(f"{path}: no 'images' list (keys: {', '.join(map(str, data)) or 'none'})")
    if not isinstance(images, list):
        raise ConfigError(
            f"{path}: 'images' is a {type(images).__name__}, not a list of {{id, file_name, ...}}"
        )
    for i, image in enumerate(images):
        missing = [k for k in ("id", "file_name") if not isinstance(image, dict) or k not in image]
        if missing:
            raise ConfigError(f"{path}: images[{i}] has no {' or '.join(missing)}")
        if isinstance(image["id"], bool) or not isinstance(image["id"], int):
            raise ConfigError(f"{path}: images[{i}] id {image['id']!r:.60} is not an integer")
        if not -(2**63) <= image["id"] < 2**63:  # stores hold ids as int64
            raise ConfigError(f"{path}: images[{i}] id {image['id']} is outside the 64-bit integer range")
        if not isinstance(image["file_name"], str) or not image["file_name"]:
            raise ConfigError(f"{path}: images[{i}] file_name {image['file_name']!r:.60} is not a file name")
    ids = [image["id"] for image in images]
    if len(set(ids)) != len(ids):
        duplicates = sorted(_duplicates(ids))
        raise ConfigError(f"{path}: duplicate image ids {duplicates[:5]}: each image needs its own id")
    annotations = [a for a in data.get("annotations") or [] if isinstance(a, dict) and "image_id" in a]
    # pycocotools indexes annotations by id; captions exported without ids get their position as one.
    annotations = [a if "id" in a else {**a, "id": -1 - i} for i, a in enumerate(annotations)]
    normalised = {"images": images, "annotations": annotations}
    # pycocotools indexes annotations by category whenever the file has 'categories'; captions files have none.
    if data.get("categories") and all("category_id" in a for a in annotations):
        normalised["categories"] = data["categories"]
    return normalised


def _duplicates(ids: list[int]) -> set[int]:
    seen, dup = set(), set()
    for i in ids:
        (dup if i in seen else seen).add(i)
    return dup


def _folder_records(images_dir: Path) -> list[ImageRecord]:
    if not images_dir.is_dir():
        raise ConfigError(f"images folder not found: {images_dir}")
    from PIL import Image

    image_suffixes = {suffix.lower() for suffix in Image.registered_extensions()}
    records = []
    for path in sorted(images_dir.rglob("*")):
        inside = path.relative_to(images_dir)
        # image files by their suffix (notes, labels and Thumbs.db are not failed images), none hidden or in a
        # hidden folder (.ipynb_checkpoints, .thumbnails)
        if path.suffix.lower() not in image_suffixes or any(part.startswith(".") for part in inside.parts):
            continue  # (a broken link or a folder named like an image is listed, and recorded as failed)
        rel = f"{images_dir.name}/{inside.as_posix()}"
        # A stable id from the split folder's name and the relative path: the same file keeps its id across
        # runs and subsets, and train/0001.jpg and val/0001.jpg do not collide.
        image_id = int(hashlib.sha1(rel.encode()).hexdigest()[:15], 16)
        outside = not path.resolve().is_relative_to(images_dir.resolve())
        records.append(
            ImageRecord(image_id, path, refused="a symlink out of the images folder" if outside else "")
        )
    return records


def image_list_sha256(records: list[ImageRecord]) -> str:
    """Identity of an image list (ids + file names) for content-addressed store keys."""
    digest = hashlib.sha256()
    for r in records:
        digest.update(f"{r.image_id}\t{r.path.name}\n".encode())
    return digest.hexdigest()[:16]


def files_sample(records: list[ImageRecord], n: int = 16) -> list[dict]:
    """A fingerprint of the images' content, which the store key (ids and file names) does not hold: the SHA-256
    of `n` files spread over the list. Recorded in each store; a dataset root pointed at other files under the
    same names (a re-encoded, resized or edited copy) no longer matches it."""
    # never a file the listing refused (a link out of the images folder)
    readable = [r for r in records if not r.refused]
    picks = sorted(set(np.linspace(0, len(readable) - 1, min(n, len(readable))).astype(int).tolist()))
    sample = [{"image_id": readable[i].image_id, "file": readable[i].path.name, "sha256": _sha256(readable[i])}
              for i in picks]  # fmt: skip
    return [d for d in sample if d["sha256"]]  # a missing file is recorded as a failure, not fingerprinted


def sample_mismatches(recorded: list[dict], records: list[ImageRecord]) -> list[str]:
    """The files of a recorded sample whose content differs now (files missing now are not counted)."""
    by_id = {r.image_id: r for r in records}
    now = {d["image_id"]: _sha256(by_id[d["image_id"]]) for d in recorded if d["image_id"] in by_id}
    return [d["file"] for d in recorded if now.get(d["image_id"]) not in (None, "", d["sha256"])]


def _sha256(record: ImageRecord) -> str:
    from pipeline.models.weights import file_sha256_cached

    try:
        stat = record.path.stat()
        if record.path.is_file():
            return file_sha256_cached(str(record.path), stat.st_size, stat.st_mtime_ns)
    except OSError:
        pass
    return ""  # missing, a folder, unreadable: the encode stage records why
