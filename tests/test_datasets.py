"""Image lists for a split: the embedded demo, hand-written COCO instances/captions files, plain folders.

Demo builds are kept tiny (12 train / 4 val) so the whole file runs in a few seconds.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError, DatasetSpec, SplitSpec, SubsetSpec
from pipeline.data import demo
from pipeline.data.datasets import image_list_sha256, list_images, select_subset

N_TRAIN, N_VAL = 12, 4


def build_demo(root: Path, seed: int = 0) -> Path:
    return demo.build(root, seed=seed, n_train=N_TRAIN, n_val=N_VAL)


def demo_spec(root: Path) -> DatasetSpec:
    return DatasetSpec(name="demo", kind="demo", root=root)


def files_by_relative_path(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_png(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), (value, 255 - value, 0)).save(path)


# --- the demo dataset ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_demo_root(tmp_path_factory) -> Path:
    return build_demo(tmp_path_factory.mktemp("demo") / "demo")


def test_demo_build_is_deterministic_for_a_seed(tmp_path):
    first = files_by_relative_path(build_demo(tmp_path / "a"))
    second = files_by_relative_path(build_demo(tmp_path / "b"))

    assert set(first) == {
        "annotations/captions_train.json",
        "annotations/captions_val.json",
        *(f"train/{i:012d}.jpg" for i in range(1, N_TRAIN + 1)),
        *(f"val/{demo.VAL_ID_OFFSET + i:012d}.jpg" for i in range(1, N_VAL + 1)),
    }
    for rel, data in first.items():
        assert data == second[rel], f"{rel} differs between two builds with the same seed"


def test_demo_build_with_another_seed_gives_other_crops(tmp_path):
    seed0 = files_by_relative_path(build_demo(tmp_path / "a", seed=0))
    seed1 = files_by_relative_path(build_demo(tmp_path / "b", seed=1))

    assert seed0["annotations/captions_train.json"] != seed1["annotations/captions_train.json"]
    assert seed0["train/000000000001.jpg"] != seed1["train/000000000001.jpg"]


def test_demo_build_leaves_no_temporary_folder_behind(tmp_path):
    build_demo(tmp_path / "demo")

    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_demo_build_keeps_an_existing_dataset_untouched(tmp_path):
    root = build_demo(tmp_path / "demo")
    before = files_by_relative_path(root)

    demo.build(root, seed=99, n_train=3, n_val=1)

    assert files_by_relative_path(root) == before


def test_demo_image_ids_are_unique_across_train_and_val_and_files_exist(tiny_demo_root):
    train = list_images(demo_spec(tiny_demo_root), "train")
    val = list_images(demo_spec(tiny_demo_root), "val")

    ids = [r.image_id for r in train + val]
    assert len(train) == N_TRAIN
    assert len(val) == N_VAL
    assert len(set(ids)) == len(ids)
    assert all(r.path.is_file() for r in train + val)
    assert all(Image.open(r.path).size[0] > 0 for r in val)


def test_demo_captions_ride_along_one_per_image_from_the_annotations(tiny_demo_root):
    for split in ("train", "val"):
        records = list_images(demo_spec(tiny_demo_root), split)
        written = json.loads((tiny_demo_root / "annotations" / f"captions_{split}.json").read_text())
        caption_of = {a["image_id"]: a["caption"] for a in written["annotations"]}

        for r in records:
            assert r.captions == (caption_of[r.image_id],)
            assert any(r.captions[0].startswith(c) for c in demo.PHOTOS.values())


# --- COCO files -------------------------------------------------------------------------------------------


def write_coco(root: Path, annotations_name: str, payload: dict) -> DatasetSpec:
    for image in payload["images"]:
        write_png(root / "images" / image["file_name"], value=image["id"] % 256)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / annotations_name).write_text(json.dumps(payload))
    # Paths relative to the dataset root, as configs/coco.yaml writes them.
    split = SplitSpec(images_dir=Path("images"), annotations=Path("annotations") / annotations_name)
    return DatasetSpec(name="tiny-coco", kind="coco", root=root, splits={"train": split})


def coco_image(image_id: int) -> dict:
    return {"id": image_id, "file_name": f"img_{image_id:04d}.png", "width": 20, "height": 20}


def test_a_coco_annotations_file_is_parsed_once_while_it_is_unchanged(tmp_path, monkeypatch):
    from pipeline.data import datasets

    parsed = []
    parse = datasets._parse_coco
    monkeypatch.setattr(datasets, "_parse_coco", lambda spec: parsed.append(spec) or parse(spec))
    payload = {"images": [coco_image(i) for i in (3, 1, 2)], "annotations": [], "categories": []}
    dataset = write_coco(tmp_path, "instances.json", payload)
    first = list_images(dataset, "train")
    assert [r.image_id for r in list_images(dataset, "train", SubsetSpec(max_images=2))] == [1, 2]
    first.clear()  # a caller's list is its own
    assert [r.image_id for r in list_images(dataset, "train")] == [1, 2, 3] and len(parsed) == 1
    write_coco(tmp_path, "instances.json", {**payload, "images": payload["images"][:2]})  # the file changed
    assert [r.image_id for r in list_images(dataset, "train")] == [1, 3] and len(parsed) == 2


def test_coco_instances_file_lists_images_sorted_by_id_without_captions(tmp_path):
    instances = {
        "images": [coco_image(30), coco_image(10), coco_image(20)],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 1, "bbox": [1, 2, 5, 6], "area": 30.0, "iscrowd": 0},
            {"id": 2, "image_id": 30, "category_id": 2, "bbox": [0, 0, 4, 4], "area": 16.0, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    dataset = write_coco(tmp_path, "instances_train.json", instances)

    records = list_images(dataset, "train")

    assert [r.image_id for r in records] == [10, 20, 30]
    assert [r.path for r in records] == [tmp_path / "images" / f"img_{i:04d}.png" for i in (10, 20, 30)]
    assert all(r.path.is_file() for r in records)
    assert all(r.captions == () for r in records)


def test_coco_captions_file_carries_every_caption_of_an_image_and_none_for_uncaptioned(tmp_path):
    captions = {
        "images": [coco_image(7), coco_image(3)],
        "annotations": [
            {"id": 1, "image_id": 7, "caption": "a red square"},
            {"id": 2, "image_id": 7, "caption": "a square that is red"},
        ],
    }
    dataset = write_coco(tmp_path, "captions_train.json", captions)

    records = list_images(dataset, "train")

    assert [(r.image_id, r.captions) for r in records] == [
        (3, ()),
        (7, ("a red square", "a square that is red")),
    ]


def test_missing_annotations_file_raises_config_error_naming_the_path(tmp_path):
    (tmp_path / "images").mkdir()
    missing = tmp_path / "annotations" / "instances_train.json"
    split = SplitSpec(images_dir=tmp_path / "images", annotations=missing)
    dataset = DatasetSpec(name="tiny-coco", kind="coco", root=tmp_path, splits={"train": split})

    with pytest.raises(ConfigError, match="annotations file not found") as caught:
        list_images(dataset, "train")
    assert str(missing) in str(caught.value)


def test_missing_images_folder_raises_config_error_naming_the_path(tmp_path):
    annotations = tmp_path / "captions_train.json"
    annotations.write_text(json.dumps({"images": [coco_image(1)], "annotations": []}))
    nowhere = SplitSpec(images_dir=Path("nowhere"), annotations=annotations)
    coco = DatasetSpec(name="tiny-coco", kind="coco", root=tmp_path, splits={"train": nowhere})
    folder = DatasetSpec(name="plain", kind="folder", root=tmp_path, splits={"train": nowhere})

    for dataset in (coco, folder):
        with pytest.raises(ConfigError, match="images folder not found") as caught:
            list_images(dataset, "train")
        assert str(tmp_path / "nowhere") in str(caught.value)


def test_unknown_split_raises_config_error_listing_the_splits_there_are(tmp_path):
    dataset = write_coco(tmp_path, "captions_train.json", {"images": [coco_image(1)], "annotations": []})

    with pytest.raises(ConfigError, match=r"no split 'test'.*\['train'\]"):
        list_images(dataset, "test")


# --- subsets ---------------------------------------------------------------------------------------------


@pytest.fixture
def twenty_image_coco(tmp_path) -> DatasetSpec:
    ids = [int(i) for i in np.random.default_rng(5).permutation(np.arange(100, 120))]  # written out of order
    return write_coco(
        tmp_path, "captions_train.json", {"images": [coco_image(i) for i in ids], "annotations": []}
    )


def test_subset_without_seed_takes_the_first_images_by_id(twenty_image_coco):
    records = list_images(twenty_image_coco, "train", SubsetSpec(max_images=5))

    assert [r.image_id for r in records] == [100, 101, 102, 103, 104]


def test_seeded_subset_is_reproducible_sorted_by_id_and_not_just_the_first_images(twenty_image_coco):
    subset = SubsetSpec(max_images=5, seed=0)

    first = list_images(twenty_image_coco, "train", subset)
    again = list_images(twenty_image_coco, "train", subset)
    other_seed = list_images(twenty_image_coco, "train", SubsetSpec(max_images=5, seed=1))

    ids = [r.image_id for r in first]
    assert ids == [r.image_id for r in again]
    assert ids == sorted(ids)
    assert len(set(ids)) == 5
    assert set(ids) <= set(range(100, 120))
    assert ids != [100, 101, 102, 103, 104]
    assert ids != [r.image_id for r in other_seed]


def test_subset_larger_than_the_split_keeps_every_image(twenty_image_coco):
    everything = list_images(twenty_image_coco, "train")

    assert len(everything) == 20
    for seed in (None, 3):
        assert list_images(twenty_image_coco, "train", SubsetSpec(max_images=50, seed=seed)) == everything


def test_image_list_identity_is_stable_and_changes_with_the_subset(twenty_image_coco):
    everything = list_images(twenty_image_coco, "train")

    assert image_list_sha256(everything) == image_list_sha256(list_images(twenty_image_coco, "train"))
    assert image_list_sha256(everything) != image_list_sha256(
        select_subset(everything, SubsetSpec(max_images=5))
    )


# --- plain folders ---------------------------------------------------------------------------------------


def folder_dataset(root: Path) -> DatasetSpec:
    return DatasetSpec(
        name="plain", kind="folder", root=root, splits={"train": SplitSpec(images_dir=Path("pics"))}
    )


def test_folder_ids_come_from_relative_paths_and_survive_moves_and_added_files(tmp_path):
    rel_paths = ["b.png", "a.png", "nested/c.png", "nested/deeper/d.png"]
    for i, rel in enumerate(rel_paths):
        write_png(tmp_path / "one" / "pics" / rel, value=10 * i)
        write_png(tmp_path / "two" / "pics" / rel, value=10 * i)
    write_png(tmp_path / "one" / "pics" / ".hidden.png")

    first = list_images(folder_dataset(tmp_path / "one"), "train")
    elsewhere = list_images(folder_dataset(tmp_path / "two"), "train")
    write_png(tmp_path / "one" / "pics" / "nested" / "added.png")
    after_adding = list_images(folder_dataset(tmp_path / "one"), "train")

    id_of = {r.path.relative_to(tmp_path / "one" / "pics").as_posix(): r.image_id for r in first}
    assert sorted(id_of) == sorted(rel_paths)  # hidden files are left out
    assert len(set(id_of.values())) == len(rel_paths)
    assert [r.image_id for r in first] == sorted(id_of.values())
    assert [r.image_id for r in elsewhere] == [r.image_id for r in first]
    assert {r.path.relative_to(tmp_path / "one" / "pics").as_posix(): r.image_id for r in after_adding} == {
        **id_of,
        "nested/added.png": next(r.image_id for r in after_adding if r.path.name == "added.png"),
    }
    assert all(r.captions == () for r in first)


def test_folder_ids_differ_between_split_folders_holding_the_same_file_names(tmp_path):
    for split in ("train", "val"):
        write_png(tmp_path / split / "0001.png", value=1)
    dataset = DatasetSpec(
        name="plain", kind="folder", root=tmp_path,
        splits={"train": SplitSpec(images_dir=Path("train")), "val": SplitSpec(images_dir=Path("val"))},
    )  # fmt: skip
    (train_record,) = list_images(dataset, "train")
    (val_record,) = list_images(dataset, "val")
    assert train_record.image_id != val_record.image_id


def test_a_folder_split_lists_image_files_only_none_hidden_and_a_broken_link_as_failed(tmp_path):
    from pipeline.data.datasets import list_images

    pics = tmp_path / "pics"
    for rel in ("a.png", "sub/b.PNG", ".hidden.png", ".ipynb_checkpoints/c.png"):
        write_png(pics / rel)
    for rel in ("notes.txt", "Thumbs.db"):
        (pics / rel).write_text("not an image")
    (pics / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    spec = DatasetSpec(
        name="plain", kind="folder", root=tmp_path, splits={"train": SplitSpec(images_dir=Path("pics"))}
    )

    listed = sorted(r.path.relative_to(pics).as_posix() for r in list_images(spec, "train"))

    assert listed == ["a.png", "gone.jpg", "sub/b.PNG"]  # the broken link: listed, then recorded as missing
