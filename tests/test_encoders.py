"""The one encoder loader, `pipeline.models.encoders.load(spec)`, on tiny real timm and transformers models.

Each model is built with random weights, saved to tmp_path the way a user would ship it (a safetensors file, a
save_pretrained folder with its image processor) and loaded back through the real code; nothing is mocked.
"""

import hashlib
import shutil
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from safetensors.torch import save_file

from pipeline.config import EncoderSpec
from pipeline.models import _torchvision_shim, encoders
from pipeline.models.weights import WeightsNotFoundError

# Before timm / transformers import torchvision, whose C extension does not load on the CPU machines.
_torchvision_shim.install()

import timm  # noqa: E402
import timm.data  # noqa: E402
from transformers import (  # noqa: E402
    BitImageProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

TIMM_MODEL = "vit_tiny_patch16_224"
TIMM_RESOLUTION, TIMM_PATCH, TIMM_WIDTH = 64, 16, 192
HF_RESOLUTION, HF_PATCH, HF_WIDTH = 32, 8, 64


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Two real photos, one square (astronaut, 512x512) and one not (chelsea, 451x300)."""
    return [Image.fromarray(skimage.data.astronaut()), Image.fromarray(skimage.data.chelsea())]


# --- timm ------------------------------------------------------------------------------------------------


def timm_spec(**overrides) -> EncoderSpec:
    fields = {
        "name": "tiny-vit-test",
        "backend": "timm",
        "model_id": TIMM_MODEL,
        "resolution": TIMM_RESOLUTION,
        "patch_size": TIMM_PATCH,
        "preprocessing_source": "timm_pretrained_cfg",
        "weights": "random",
        **overrides,
    }
    return EncoderSpec(**fields)


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A seeded tiny ViT saved as a safetensors state dict, and the in-memory model it came from."""
    torch.manual_seed(1234)
    model = timm.create_model(TIMM_MODEL, img_size=TIMM_RESOLUTION, num_classes=0).eval()
    path = tmp_path_factory.mktemp("timm") / "tiny_vit.safetensors"
    save_file(model.state_dict(), str(path))
    return path, model


def test_timm_checkpoint_file_gives_block_minus_two_patch_tokens_without_the_cls_token(
    timm_checkpoint, photos
):
    path, model = timm_checkpoint
    encoder = encoders.load(
        timm_spec(weights=str(path), feature_layer=-2, n_prefix_tokens=1, hidden_dim=TIMM_WIDTH), device="cpu"
    )
    pixels = torch.stack([encoder.preprocess(p) for p in photos])

    features = encoder.encode(pixels)

    with torch.inference_mode():
        (block_minus_two_nchw,) = model.forward_intermediates(pixels, indices=[-2], intermediates_only=True)
    assert features.shape == (2, 4, 4, TIMM_WIDTH)
    assert features.dtype == torch.float32
    torch.testing.assert_close(features, block_minus_two_nchw.permute(0, 2, 3, 1), rtol=0, atol=1e-5)
    assert encoder.n_prefix_tokens == 1
    assert encoder.hidden_dim == TIMM_WIDTH
    assert encoder.describe()["n_prefix_tokens_dropped"] == 1
    assert encoder.weights_id == f"file:{path.name} sha256={hashlib.sha256(path.read_bytes()).hexdigest()}"


def test_timm_feature_layer_last_gives_the_normed_final_tokens_without_the_cls_token(timm_checkpoint, photos):
    path, model = timm_checkpoint
    encoder = encoders.load(timm_spec(weights=str(path), feature_layer="last"), device="cpu")
    pixels = torch.stack([encoder.preprocess(p) for p in photos])

    features = encoder.encode(pixels)

    with torch.inference_mode():
        final_tokens = model.forward_features(pixels)
    assert encoder.n_prefix_tokens == 1
    torch.testing.assert_close(features, final_tokens[:, 1:].reshape(2, 4, 4, TIMM_WIDTH), rtol=0, atol=1e-5)


def test_timm_checkpoint_folder_with_model_safetensors_loads_the_same_weights(
    timm_checkpoint, tmp_path, photos
):
    path, _ = timm_checkpoint
    shutil.copy(path, tmp_path / "model.safetensors")
    from_file = encoders.load(timm_spec(weights=str(path)), device="cpu")
    from_folder = encoders.load(timm_spec(weights=str(tmp_path)), device="cpu")
    pixels = from_file.preprocess(photos[1])[None]

    torch.testing.assert_close(from_folder.encode(pixels), from_file.encode(pixels), rtol=0, atol=0)


def test_timm_random_weights_are_reproducible_from_the_seed():
    seed0 = encoders.load(timm_spec(seed=0), device="cpu")
    seed0_again = encoders.load(timm_spec(seed=0), device="cpu")
    seed1 = encoders.load(timm_spec(seed=1), device="cpu")

    assert seed0.weights_id == seed0_again.weights_id
    assert seed0.weights_id != seed1.weights_id
    assert seed0.weights_id.startswith("random-init seed=0 sha256=")


def test_timm_preprocess_equals_timms_own_eval_transform_on_real_photos(timm_checkpoint, photos):
    path, model = timm_checkpoint
    encoder = encoders.load(timm_spec(weights=str(path)), device="cpu", geometry="native")
    data_config = timm.data.resolve_model_data_config(model)
    data_config["input_size"] = (3, TIMM_RESOLUTION, TIMM_RESOLUTION)
    timm_eval = timm.data.create_transform(**data_config, is_training=False)

    for photo in photos:
        ours = encoder.preprocess(photo)
        theirs = timm_eval(photo)
        assert ours.shape == theirs.shape == (3, TIMM_RESOLUTION, TIMM_RESOLUTION)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert encoder.preprocessing.interpolation == data_config["interpolation"]
    assert encoder.preprocessing.mean == tuple(data_config["mean"])


def test_the_shared_geometry_equals_timms_eval_transform_without_a_crop_margin(timm_checkpoint, photos):
    path, model = timm_checkpoint
    encoder = encoders.load(timm_spec(weights=str(path)), device="cpu")
    data_config = timm.data.resolve_model_data_config(model)
    assert data_config["crop_pct"] < 1  # otherwise this test shows nothing
    data_config.update(input_size=(3, TIMM_RESOLUTION, TIMM_RESOLUTION), crop_pct=1.0)
    timm_full_view = timm.data.create_transform(**data_config, is_training=False)

    for photo in photos:
        torch.testing.assert_close(encoder.preprocess(photo), timm_full_view(photo), rtol=0, atol=1e-5)


def test_spec_with_wrong_n_prefix_tokens_fails_naming_the_field():
    with pytest.raises(ValueError, match=r"n_prefix_tokens=0 .* returns 1 tokens"):
        encoders.load(timm_spec(n_prefix_tokens=0), device="cpu")


def test_spec_with_wrong_hidden_dim_fails_naming_the_field():
    with pytest.raises(ValueError, match=rf"hidden_dim=768 .* D={TIMM_WIDTH}"):
        encoders.load(timm_spec(hidden_dim=768), device="cpu")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"feature_layer": -50}, r"feature_layer -50 does not exist; the model has \d+ blocks"),
        ({"hidden_dim": 768}, rf"hidden_dim 768, but layer -2 of '.*' is {TIMM_WIDTH} wide"),
        # it failed at encode as "the model returns -47 tokens before its 8x8 patch grid; fix n_prefix_tokens"
        ({"patch_size": TIMM_PATCH // 2, "resolution": TIMM_RESOLUTION},
         rf"patch_size {TIMM_PATCH // 2}, but layer -2 of '.*' has patches of {TIMM_PATCH} px; fix patch_size"),
        ({"feature_layer": "last", "patch_size": TIMM_PATCH * 2, "resolution": TIMM_PATCH * 4}, "fix patch_size"),
        ({"n_prefix_tokens": 0}, r"n_prefix_tokens 0, but '.*' puts 1 before its patch tokens"),
    ],
)  # fmt: skip
def test_a_specs_layer_and_width_are_checked_against_the_network_before_loading_it(overrides, expected):
    from pipeline.config import ConfigError
    from pipeline.models import model_ids

    spec = timm_spec(**overrides, weights="/nowhere")  # no weights needed: built on the meta device
    with pytest.raises(ConfigError, match=expected):
        model_ids.check_layer_and_width(spec)
    model_ids.check_layer_and_width(timm_spec(weights="/nowhere"))  # the right ones pass


# --- transformers ----------------------------------------------------------------------------------------

TINY_VIT = {
    "hidden_size": HF_WIDTH,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "image_size": HF_RESOLUTION,
    "patch_size": HF_PATCH,
}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def build_clip():
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPVisionModel(CLIPVisionConfig(**TINY_VIT)), processor


def build_siglip():
    return SiglipVisionModel(SiglipVisionConfig(**TINY_VIT)), SiglipImageProcessor(
        size={"height": 32, "width": 32}
    )


def build_dinov2():
    # DINOv2's processor resizes the short side a little larger than the crop (256 -> 224); keep that ratio.
    processor = BitImageProcessor(
        size={"shortest_edge": 36},
        crop_size={"height": 32, "width": 32},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    return Dinov2Model(Dinov2Config(**TINY_VIT)), processor


HF_MODELS = {"clip": (build_clip, 1), "siglip": (build_siglip, 0), "dinov2": (build_dinov2, 1)}


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory) -> dict:
    """name -> (save_pretrained folder, in-memory model, image processor), for each tiny HF model."""
    saved = {}
    for i, (name, (build, _)) in enumerate(HF_MODELS.items()):
        torch.manual_seed(100 + i)
        model, processor = build()
        folder = tmp_path_factory.mktemp(f"hf_{name}")
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        saved[name] = (folder, model.eval(), processor)
    return saved


def hf_spec(name: str, weights: str, **overrides) -> EncoderSpec:
    fields = {
        "name": f"tiny-{name}-test",
        "backend": "transformers",
        "model_id": f"tiny-random-{name}-vision",
        "resolution": HF_RESOLUTION,
        "patch_size": HF_PATCH,
        "preprocessing_source": "hf_image_processor",
        "weights": weights,
        **overrides,
    }
    return EncoderSpec(**fields)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def empty_hf_cache(monkeypatch, tmp_path) -> Path:
    """An empty Hugging Face cache, so a model cached on a developer's machine does not hide the failure."""
    cache = tmp_path / "empty_hf_cache"
    cache.mkdir()
    # huggingface_hub reads HF_HUB_CACHE once at import; setting the variable now would not reach it.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_transformers_folder_gives_hidden_state_minus_two_patch_tokens_without_prefix(
    name, hf_saved, photos, offline
):
    folder, model, _ = hf_saved[name]
    n_prefix = HF_MODELS[name][1]
    encoder = encoders.load(
        hf_spec(name, str(folder), n_prefix_tokens=n_prefix, hidden_dim=HF_WIDTH), device="cpu"
    )
    pixels = torch.stack([encoder.preprocess(p) for p in photos])

    features = encoder.encode(pixels)

    with torch.inference_mode():
        hidden_minus_two = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert encoder.n_prefix_tokens == n_prefix
    assert hidden_minus_two.shape[1] == n_prefix + 16
    assert features.shape == (2, 4, 4, HF_WIDTH)
    torch.testing.assert_close(
        features, hidden_minus_two[:, n_prefix:].reshape(2, 4, 4, HF_WIDTH), rtol=0, atol=1e-5
    )
    assert encoder.weights_id.startswith("dir:model.safetensors sha256=")


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_transformers_preprocess_is_close_to_the_hf_image_processors_own_output(
    name, hf_saved, photos, offline
):
    folder, _, processor = hf_saved[name]
    encoder = encoders.load(hf_spec(name, str(folder)), device="cpu", geometry="native")

    for photo in photos:
        ours = encoder.preprocess(photo)
        theirs = processor(images=photo, return_tensors="pt").pixel_values[0]
        assert ours.shape == theirs.shape == (3, HF_RESOLUTION, HF_RESOLUTION)
        # HF may resize with another backend (torchvision tensors, not PIL), so allow small differences.
        assert (ours - theirs).abs().mean().item() < 0.02


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_native_geometry_equals_the_hf_pil_processor_exactly_on_an_odd_crop_margin(name, hf_saved, offline):
    from transformers import AutoImageProcessor

    folder = hf_saved[name][0]
    encoder = encoders.load(hf_spec(name, str(folder)), device="cpu", geometry="native")
    # 330x300: the long side resizes to 35 (CLIP) / 39 (DINOv2) for a 32 crop, a margin of 3 or 7 that
    # transformers splits 1+2 / 3+4 (floor) and torchvision's CenterCrop 2+1 / 4+3 (round half to even)
    photo = Image.fromarray(skimage.data.chelsea()).crop((0, 0, 330, 300))
    theirs = AutoImageProcessor.from_pretrained(folder, backend="pil")(images=photo, return_tensors="pt")

    torch.testing.assert_close(encoder.preprocess(photo), theirs.pixel_values[0], rtol=0, atol=1e-6)


def test_hub_weights_from_the_cache_record_the_commit_they_are_keyed_by(hf_saved, offline, empty_hf_cache):
    from pipeline.models.weights import weights_key

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = empty_hf_cache / "models--tiny-org--tiny-clip"
    shutil.copytree(hf_saved["clip"][0], repo_dir / "snapshots" / commit)  # as huggingface_hub lays it out
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    spec = hf_spec("clip", "pretrained", model_id="tiny-org/tiny-clip")

    encoder = encoders.load(spec, device="cpu")

    assert encoder.weights_id == weights_key(spec) == f"hf:tiny-org/tiny-clip@{commit}"


def test_transformers_spec_with_wrong_n_prefix_tokens_fails_naming_the_field(hf_saved, offline):
    folder = hf_saved["siglip"][0]

    with pytest.raises(ValueError, match=r"n_prefix_tokens=1 .* returns 0 tokens"):
        encoders.load(hf_spec("siglip", str(folder), n_prefix_tokens=1), device="cpu")


# --- weights that are not there --------------------------------------------------------------------------

PRETRAINED_ELSEWHERE = [
    pytest.param(
        "timm",
        "vit_base_patch16_siglip_224.v2_webli",
        "timm_pretrained_cfg",
        "timm/vit_base_patch16_siglip_224.v2_webli",
        id="timm",
    ),
    pytest.param(
        "transformers",
        "google/siglip-base-patch16-224",
        "hf_image_processor",
        "google/siglip-base-patch16-224",
        id="transformers",
    ),
]


@pytest.mark.parametrize(("backend", "model_id", "preprocessing_source", "hub_repo"), PRETRAINED_ELSEWHERE)
def test_offline_pretrained_weights_not_in_the_cache_fail_fast_saying_where_we_looked_and_how_to_fix(
    backend, model_id, preprocessing_source, hub_repo, offline, empty_hf_cache
):
    spec = EncoderSpec(
        name="siglip-missing",
        backend=backend,
        model_id=model_id,
        resolution=224,
        patch_size=16,
        preprocessing_source=preprocessing_source,
        weights="pretrained",
    )

    started = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as caught:
        encoders.load(spec, device="cpu")
    seconds = time.perf_counter() - started

    message = str(caught.value)
    assert seconds < 15
    assert f"'{model_id}'" in message
    assert "siglip-missing" in message
    assert f"looked in: Hugging Face cache {empty_hf_cache}" in message
    assert hub_repo in message
    assert "HF_HUB_OFFLINE=1" in message
    assert "to provide them:" in message
    assert "`weights:` in the spec of 'siglip-missing'" in message


@pytest.mark.parametrize(
    ("spec_of", "expected"),
    [
        pytest.param(
            lambda missing: timm_spec(weights=str(missing / "tiny_vit.safetensors")),
            "a file, or a folder with one of",
            id="timm-file",
        ),
        pytest.param(
            lambda missing: hf_spec("clip", str(missing)),
            "expected a save_pretrained folder with config.json",
            id="transformers-folder",
        ),
    ],
)
def test_local_weights_path_that_does_not_exist_fails_naming_the_path(spec_of, expected, tmp_path, offline):
    missing = tmp_path / "not_here"

    with pytest.raises(WeightsNotFoundError) as caught:
        encoders.load(spec_of(missing), device="cpu")

    message = str(caught.value)
    assert f"looked in: {missing}" in message
    assert expected in message


def test_transformers_folder_without_config_json_is_reported_as_missing_weights(tmp_path, offline):
    (tmp_path / "model.safetensors").write_bytes(b"")

    with pytest.raises(WeightsNotFoundError, match="config.json"):
        encoders.load(hf_spec("clip", str(tmp_path)), device="cpu")


def test_missing_weights_message_suggests_a_download_command_that_is_installed(offline, empty_hf_cache):
    spec = timm_spec(model_id="vit_base_patch16_siglip_224.v2_webli", resolution=224, weights="pretrained")

    with pytest.raises(WeightsNotFoundError) as caught:
        encoders.load(spec, device="cpu")

    suggested = str(caught.value).split("run `", 1)[1].split("`", 1)[0]
    executable = suggested.split()[0]
    assert (Path(sys.executable).parent / executable).is_file() or shutil.which(executable), suggested


def test_preprocess_returns_a_float_tensor_that_normalize_matches_on_uint8_pixels(timm_checkpoint, photos):
    path, _ = timm_checkpoint
    encoder = encoders.load(timm_spec(weights=str(path)), device="cpu")
    pixels_uint8 = torch.from_numpy(np.stack([encoder.preprocessing.to_pixels(p) for p in photos]))

    batched = encoder.normalize(pixels_uint8)

    assert batched.dtype == torch.float32
    for i, photo in enumerate(photos):
        torch.testing.assert_close(encoder.preprocess(photo), batched[i], rtol=0, atol=0)
