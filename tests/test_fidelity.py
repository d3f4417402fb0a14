"""The paper's setup or a named difference: encoder architectures match their weights, one image geometry for
every encoder, stored features equal recomputed ones, and no image that trained or selected a reconstructor is
scored by it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from pipeline.config import (
    DatasetSpec,
    EncodeOptions,
    EncoderSpec,
    EvaluateConfig,
    SplitSpec,
    StoreOptions,
    SubsetSpec,
    TrainConfig,
)
from pipeline.config_files import REPO_CONFIG_DIR, resolve_encoder
from pipeline.models import encoders, model_ids
from pipeline.models.checkpoints import DisjointnessError
from pipeline.stages import encode, evaluate, train
from pipeline.stages.verify import verify

SPEC_FILES = sorted((REPO_CONFIG_DIR / "encoders").glob("*.yaml"))


@pytest.mark.parametrize("spec_file", SPEC_FILES, ids=lambda p: p.stem)
def test_every_shipped_encoder_spec_builds_the_architecture_its_weights_were_trained_with(spec_file):
    model_ids.check_architecture(EncoderSpec.model_validate(yaml.safe_load(spec_file.read_text())))


def test_the_openai_and_metaclip_specs_use_timms_quickgelu_models():
    for name in ("clip-b16-openai", "clip-b16-metaclip"):
        spec = yaml.safe_load((REPO_CONFIG_DIR / "encoders" / f"{name}.yaml").read_text())
        assert spec["model_id"].startswith("vit_base_patch16_clip_quickgelu_224."), spec["model_id"]


def test_a_quickgelu_checkpoint_in_an_exact_gelu_model_is_refused_naming_the_right_id():
    spec = yaml.safe_load((REPO_CONFIG_DIR / "encoders" / "clip-b16-openai.yaml").read_text())
    spec["model_id"] = "vit_base_patch16_clip_224.openai"
    with pytest.raises(
        model_ids.ArchitectureMismatchError, match=r"model_id: vit_base_patch16_clip_quickgelu_224\.openai$"
    ):
        model_ids.check_architecture(EncoderSpec.model_validate(spec))


def test_an_activation_override_on_pretrained_weights_is_refused():
    spec = yaml.safe_load((REPO_CONFIG_DIR / "encoders" / "clip-b16-laion.yaml").read_text())
    spec["model_kwargs"] = {"act_layer": "quick_gelu"}
    with pytest.raises(model_ids.ArchitectureMismatchError, match="act_layer"):
        model_ids.check_architecture(EncoderSpec.model_validate(spec))


def test_encode_refuses_a_mismatched_spec_in_one_line_before_any_work(write_run_config, tmp_path):
    spec = yaml.safe_load((REPO_CONFIG_DIR / "encoders" / "clip-b16-metaclip.yaml").read_text())
    spec["model_id"] = "vit_base_patch16_clip_224.metaclip_2pt5b"
    config = write_run_config(encoders=["tiny-vit-64", spec])
    out = CliRunner().invoke(app, ["encode", "--config", str(config), "--no-progress"])
    assert out.exit_code == 2, out.output
    assert "vit_base_patch16_clip_quickgelu_224.metaclip_2pt5b" in out.output
    assert "Traceback" not in out.output and not (tmp_path / "stores").exists()


def test_short_side_crop_gives_every_encoder_the_whole_short_side(make_job):
    spec = make_job().encoder  # tiny-vit-64: timm crop_pct 0.9 natively
    native = encoders.load(spec, device="cpu", geometry="native").preprocessing
    shared = encoders.load(spec, device="cpu").preprocessing
    assert (native.resize_size, native.crop_size, native.geometry) == (71, 64, "native")  # floor(64 / 0.9)
    assert (shared.resize_size, shared.crop_size, shared.geometry) == (64, 64, "short_side_crop")
    assert (shared.mean, shared.std, shared.interpolation) == (native.mean, native.std, native.interpolation)


def test_the_geometry_is_recorded_in_the_store_and_changes_its_key(make_job):
    shared = encode.run(make_job(subset=SubsetSpec(max_images=4)), progress=False)
    native = encode.run(
        make_job(
            subset=SubsetSpec(max_images=4),
            options=EncodeOptions(batch_size=8, num_workers=0, geometry="native"),
        ),
        progress=False,
    )
    assert shared.store_path != native.store_path
    attrs = [zarr.open_group(str(r.store_path), mode="r").attrs for r in (shared, native)]
    assert [a["config"]["geometry"] for a in attrs] == ["short_side_crop", "native"]
    assert [a["encoder"]["preprocessing"]["geometry"] for a in attrs] == ["short_side_crop", "native"]


def test_judges_see_the_stored_square_image_resized_without_a_crop():
    judge = evaluate.load_judges([resolve_encoder("tiny-judge")], "cpu")["tiny-judge"]
    assert judge.preprocessing.geometry == "short_side_crop"
    assert judge.preprocessing.resize_size == judge.preprocessing.crop_size


def test_judges_get_the_released_codes_224_px_input_bilinear_without_antialiasing_and_truncated():
    from pipeline.models.judges import released_judge_input

    # Halving with bilinear interpolation (align_corners=False, no antialiasing) averages each 2x2 block; the
    # released code then truncates: blocks of mean 10.5 and 200.75 give 10 and 200 (rounding: 11 and 201;
    # antialiasing would mix in the neighbouring blocks).
    images = np.zeros((1, 448, 448, 3), np.uint8)
    images[0, ::2, :, 0], images[0, 1::2, :, 0] = 10, 11
    images[0, :, :, 1] = np.where(np.arange(448) % 4 < 2, 0, 255).astype(np.uint8)[None, :]
    images[0, ::2, ::2, 2], images[0, ::2, 1::2, 2], images[0, 1::2, :, 2] = 200, 201, 201
    out = released_judge_input(images, 224)
    assert out.shape == (1, 224, 224, 3) and out.dtype == np.uint8
    assert (out[..., 0] == 10).all() and (out[..., 2] == 200).all()
    assert set(np.unique(out[..., 1])) == {0, 255}  # no antialiasing: blocks do not mix


def test_judges_judge_grayscale_as_pil_converts_it_after_the_released_resize():
    from pipeline.models import judges

    seen = []

    class Judge:  # records what a judge's processor receives
        def preprocess(self, image):
            seen.append(np.asarray(image))
            return torch.zeros(3, 4, 4)

        def embed(self, batch):
            return torch.ones(len(batch), 2)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    judges.cosines(Judge(), images, images, True, 24)
    expected = [np.asarray(Image.fromarray(im).convert("L").convert("RGB")) for im in
                judges.released_judge_input(images, 24)]  # fmt: skip
    assert all(np.array_equal(a, b) for a, b in zip(seen[:2], expected, strict=True))
    seen.clear()
    judges.cosines(Judge(), images, images, False, None)
    assert np.array_equal(seen[0], images[0])


def test_store_verify_passes_on_an_honest_store(make_job):
    path = encode.run(
        make_job(subset=SubsetSpec(max_images=8), store=StoreOptions(shard_images=4)), progress=False
    ).store_path
    report = verify(path, n_images=4, device="cpu")
    assert len(report.checks) == 4 and not report.mismatches, report.checks
    assert report.largest_error <= 2.0**-11 + 1e-3
    assert all(c.pixel_max_abs_diff == 0 for c in report.checks) and not report.notes


def test_store_verify_decodes_as_the_store_was_encoded_with_jpeg_draft_1x(make_job, tmp_path):
    from skimage import data

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, name in enumerate(("astronaut", "coffee")):  # big enough for libjpeg's 1/4 scale at 64 px
        Image.fromarray(getattr(data, name)()).convert("RGB").save(folder / f"{i}.jpg", quality=90)
    dataset = DatasetSpec(
        name="photos", kind="folder", root=tmp_path, splits={"all": SplitSpec(images_dir=folder)}
    )
    options = EncodeOptions(batch_size=2, num_workers=0, jpeg_draft="1x")
    path = encode.run(make_job(dataset=dataset, split="all", options=options), progress=False).store_path
    report = verify(path, n_images=2, device="cpu")
    assert not report.mismatches and all(c.pixel_max_abs_diff == 0 for c in report.checks), report.checks


def test_store_verify_catches_a_store_encoded_with_another_crop_than_it_records(make_job):
    job = make_job(
        subset=SubsetSpec(max_images=8), options=EncodeOptions(batch_size=8, num_workers=0, geometry="native")
    )
    path = encode.run(job, progress=False).store_path
    # Plant the mismatch: the store claims the shared geometry but its features come from the 0.9 crop.
    group = zarr.open_group(str(path), mode="r+")
    config, encoder = dict(group.attrs["config"]), dict(group.attrs["encoder"])
    shared = encoders.load(job.encoder, device="cpu").preprocessing
    group.attrs.update({"config": {**config, "geometry": "short_side_crop"},
                        "encoder": {**encoder, "preprocessing": shared.to_dict()}})  # fmt: skip
    out = CliRunner().invoke(app, ["store", "verify", str(path), "--recompute", "3", "--device", "cpu"])
    assert out.exit_code == 1, out.output
    assert "MISMATCH: 3 of 3 images" in out.output
    report = verify(path, n_images=3, device="cpu")
    assert report.largest_error > 0.1 and all(c.pixel_max_abs_diff > 0 for c in report.checks)
    assert all(str(c.image_id) in out.output for c in report.checks)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_dataset):
    """tiny-vit-64 stores of train (16 images) and val, and one reconstructor selected on val ('best_val')."""
    from pipeline.config import TransformSpec
    from pipeline.config_files import resolve_encoder

    root = tmp_path_factory.mktemp("leak")

    def store(split, subset=SubsetSpec()) -> Path:
        job = encode.EncodeJob(root / "stores", demo_dataset, split, subset, resolve_encoder("tiny-vit-64"),
                               TransformSpec(), StoreOptions(shard_images=8), EncodeOptions(batch_size=8, num_workers=0))  # fmt: skip
        return encode.run(job, progress=False).store_path

    train_store, val_store = store("train", SubsetSpec(max_images=16)), store("val")
    cfg = TrainConfig(output_root=root / "train", epochs=1, batch_size=8, n_val_images=4, n_sample_images=2,
                      shuffle_buffer_images=8)  # fmt: skip
    last = train.run(train.TrainJob(train_store, val_store, cfg), progress=False)
    best = train.run(train.TrainJob(train_store, val_store, cfg.model_copy(update={"select_checkpoint": "best_val"})),
                     progress=False)  # fmt: skip
    return train_store, val_store, last, best, root


def test_the_default_checkpoint_is_the_last_and_selects_nothing(trained):
    _, _, last, best, _ = trained
    assert last.checkpoint == last.last_checkpoint and last.checkpoint.name.startswith("epoch-")
    assert best.checkpoint.name == "best.json" and last.run_dir != best.run_dir


def test_evaluate_refuses_to_score_images_that_trained_the_reconstructor(trained):
    train_store, _, last, _, root = trained
    cfg = EvaluateConfig(output_root=root / "eval", judges=[], judge_modes=["grayscale"], device="cpu")
    with pytest.raises(DisjointnessError, match="16 of its images trained the reconstructor"):
        evaluate.score_encoder(evaluate.EvalTarget("tiny-vit-64", train_store, last.checkpoint), {}, cfg)


def test_held_out_images_are_told_apart_by_file_not_by_id(make_job, tmp_path):
    """A custom COCO-format set numbers each split's images from 1: equal ids are different images, and the
    same file listed by two splits under other ids is the same image."""
    import json

    from pipeline.models.checkpoints import check_held_out
    from storage import open_store

    root = tmp_path / "custom"
    # split: (folder, [(id, name)]); "copy" holds a copy of train's c.png, under its id, in another folder
    listed = {"train": ("train", [(1, "a"), (2, "b"), (3, "c")]), "val": ("val", [(1, "d"), (2, "e")]),
              "leaky": ("train", [(7, "f"), (8, "c")]), "copy": ("copy", [(3, "c"), (9, "g")])}  # fmt: skip
    for split, (folder, images) in listed.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for image_id, name in images:
            Image.new("RGB", (48, 40), (20 * image_id, 100, 200)).save(root / folder / f"{name}.png")
        records = [{"id": image_id, "file_name": f"{name}.png"} for image_id, name in images]
        (root / f"{split}.json").write_text(json.dumps({"images": records}))
    dataset = DatasetSpec(name="custom", kind="coco", root=root,
                          splits={s: SplitSpec(images_dir=f, annotations=f"{s}.json") for s, (f, _) in listed.items()})  # fmt: skip
    stores = {split: open_store(encode.run(make_job(dataset=dataset, split=split), progress=False).store_path)
              for split in listed}  # fmt: skip
    header = {"train_store": str(stores["train"].path), "_json_path": "epoch-1.json"}
    assert set(stores["val"].image_ids()) <= set(stores["train"].image_ids())  # ids 1, 2 in both splits
    check_held_out(stores["val"], np.arange(2), header, "evaluate split 'val'")  # other files: held out
    with pytest.raises(
        DisjointnessError, match=r"1 of its images trained the reconstructor .*files \['c\.png'\]"
    ):
        check_held_out(stores["leaky"], np.arange(2), header, "evaluate split 'leaky'")
    with pytest.raises(DisjointnessError, match=r"1 of its images trained .*files \['c\.png'\]"):
        check_held_out(stores["copy"], np.arange(2), header, "evaluate split 'copy'")  # same id and name


def test_evaluate_refuses_to_score_images_that_selected_the_reconstructor(trained):
    _, val_store, last, best, root = trained
    cfg = EvaluateConfig(output_root=root / "eval", judges=[], judge_modes=["grayscale"], device="cpu")
    with pytest.raises(DisjointnessError, match="12 of its images selected the reconstructor"):
        evaluate.score_encoder(evaluate.EvalTarget("tiny-vit-64", val_store, best.checkpoint), {}, cfg)
    scores, _, _ = evaluate.score_encoder(
        evaluate.EvalTarget("tiny-vit-64", val_store, last.checkpoint), {}, cfg
    )
    assert scores["image_id"].nunique() == 12


def test_a_training_run_folder_stands_for_its_chosen_checkpoint(trained):
    from pipeline.models.checkpoints import read_header

    _, _, last, best, _ = trained
    assert read_header(last.run_dir)["_json_path"] == str(last.checkpoint)
    assert read_header(best.run_dir)["_json_path"] == str(best.checkpoint)
    assert np.isfinite(read_header(best.run_dir)["best_val_psnr_db"])
