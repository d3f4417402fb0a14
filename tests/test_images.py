"""Decoding real, awkward image files to RGB uint8 (or a recorded reason), pixel transforms, encoder resize/crop.

Every bad input is a real file written with PIL/numpy into tmp_path; nothing is mocked.
"""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from pipeline.config import TransformSpec
from pipeline.data.images import (
    ImageSkipped,
    Preprocessing,
    apply_transform,
    decode_for_encoder,
    load_rgb,
    load_rgb_array,
)

MIN_SIDE = 16
MAX_PIXELS = 178_956_970


def load(path: Path, **overrides) -> Image.Image:
    return load_rgb(path, **{"min_side": MIN_SIDE, "max_pixels": MAX_PIXELS, **overrides})


def skip_reason(path: Path, **overrides) -> str:
    with pytest.raises(ImageSkipped) as caught:
        load(path, **overrides)
    return str(caught.value)


@pytest.fixture(scope="module")
def photo_rgb() -> np.ndarray:
    """A real photo, small enough to keep the tests fast: the cat's face from scikit-image's chelsea."""
    return np.ascontiguousarray(skimage.data.chelsea()[50:150, 100:220])


# --- bad files are skipped with a reason that says what is wrong --------------------------------------------


def test_truncated_jpeg_is_skipped_as_corrupt_and_says_truncated(tmp_path, photo_rgb):
    path = tmp_path / "cut.jpg"
    Image.fromarray(photo_rgb).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    reason = skip_reason(path)

    assert reason.startswith("corrupt image")
    assert "truncated" in reason


def test_a_jpeg_with_garbled_image_data_is_skipped_and_extra_bytes_after_it_are_not(tmp_path):
    astronaut = skimage.data.astronaut()
    path = tmp_path / "garbled.jpg"
    Image.fromarray(astronaut).save(path, quality=90)
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 2000] = np.random.default_rng(1).bytes(2000)
    path.write_bytes(bytes(data))  # PIL decodes it quietly, half the photo flat grey
    limits = {"min_side": MIN_SIDE, "max_pixels": MAX_PIXELS}

    with pytest.raises(ImageSkipped, match="^corrupt image: Corrupt JPEG data"):
        load_rgb_array(path, **limits)  # the encode stage's decoder

    padded = tmp_path / "padded.jpg"  # bytes after the image data: a common, harmless libjpeg warning
    Image.fromarray(astronaut).save(padded, quality=90)
    body = padded.read_bytes()
    padded.write_bytes(body[:-2] + b"\x00" * 64 + body[-2:])
    assert np.array_equal(load_rgb_array(padded, **limits), np.asarray(Image.open(padded).convert("RGB")))


def test_text_file_with_an_image_suffix_is_skipped_as_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are not pixels\n")

    assert "not an image" in skip_reason(path)


def test_empty_file_is_skipped_as_empty(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")

    assert skip_reason(path) == "empty file (0 bytes)"


def test_missing_file_is_skipped_as_missing(tmp_path):
    assert "missing" in skip_reason(tmp_path / "never_written.jpg")


def test_one_pixel_png_is_skipped_as_too_small_with_its_size_and_the_limit(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (10, 20, 30)).save(path)

    reason = skip_reason(path)

    assert reason.startswith("too small")
    assert "1x1" in reason
    assert str(MIN_SIDE) in reason


def test_image_above_max_pixels_is_skipped_as_too_large_with_its_size_and_the_limit(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (200, 200), (10, 20, 30)).save(path)

    reason = skip_reason(path, max_pixels=10_000)

    assert reason.startswith("too large")
    assert "200x200" in reason
    assert "10000" in reason


# --- every colour mode comes back as 8-bit RGB --------------------------------------------------------------


def test_grayscale_jpeg_becomes_rgb_with_three_equal_channels(tmp_path, photo_rgb):
    path = tmp_path / "gray.jpg"
    Image.fromarray(photo_rgb).convert("L").save(path, quality=90)

    img = load(path)

    pixels = np.asarray(img)
    assert img.mode == "RGB"
    assert pixels.shape == (*photo_rgb.shape[:2], 3)
    decoded_luma = np.asarray(Image.open(path))
    for c in range(3):
        np.testing.assert_array_equal(pixels[..., c], decoded_luma)


def test_cmyk_jpeg_becomes_rgb_with_the_right_colours(tmp_path):
    path = tmp_path / "cmyk.jpg"
    cmyk = Image.new("CMYK", (64, 32), (0, 255, 255, 0))  # red
    cmyk.paste((255, 0, 0, 0), (32, 0, 64, 32))  # cyan
    cmyk.save(path, quality=95)

    img = load(path)

    pixels = np.asarray(img).astype(int)
    assert img.mode == "RGB"
    np.testing.assert_allclose(pixels[16, 8], (255, 0, 0), atol=12)
    np.testing.assert_allclose(pixels[16, 56], (0, 255, 255), atol=12)


def test_rgba_png_transparent_areas_become_white_and_half_transparent_ones_blend(tmp_path):
    path = tmp_path / "alpha.png"
    rgba = np.zeros((32, 48, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # hidden colour under the transparent part: must not show
    rgba[:, :16, 3] = 255  # opaque red-ish
    rgba[:, 16:32, 3] = 0  # fully transparent
    rgba[:, 32:, :3] = 0
    rgba[:, 32:, 3] = 128  # half-transparent black
    Image.fromarray(rgba, "RGBA").save(path)

    img = load(path)

    pixels = np.asarray(img).astype(int)
    assert img.mode == "RGB"
    np.testing.assert_array_equal(pixels[5, 5], (200, 0, 0))
    np.testing.assert_array_equal(pixels[5, 20], (255, 255, 255))
    np.testing.assert_allclose(pixels[5, 40], (127, 127, 127), atol=1)


def test_palette_png_with_a_transparent_index_becomes_rgb_with_white_there(tmp_path):
    path = tmp_path / "palette.png"
    img = Image.new("P", (32, 32), 0)
    img.putpalette([10, 20, 30, 200, 0, 0] + [0] * (256 * 3 - 6))
    img.paste(1, (0, 0, 16, 32))  # left half: palette entry 1 (red); right half: entry 0, transparent
    img.save(path, transparency=0)
    assert Image.open(path).mode == "P"

    loaded = load(path)

    pixels = np.asarray(loaded)
    assert loaded.mode == "RGB"
    np.testing.assert_array_equal(pixels[10, 5], (200, 0, 0))
    np.testing.assert_array_equal(pixels[10, 25], (255, 255, 255))


def test_sixteen_bit_grayscale_png_is_rescaled_to_the_full_eight_bit_range_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    # 257 * k in 16 bits is exactly k in 8 bits (65535 = 257 * 255).
    levels = np.arange(256, dtype=np.uint16).reshape(16, 16)
    Image.fromarray(levels * 257).save(path)
    assert Image.open(path).mode == "I;16"

    pixels = np.asarray(load(path))

    assert pixels.dtype == np.uint8
    assert pixels.shape == (16, 16, 3)
    for c in range(3):
        np.testing.assert_array_equal(pixels[..., c], levels)


def test_exif_orientation_is_applied_so_the_photo_stands_upright(tmp_path, photo_rgb):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(photo_rgb).save(path, exif=exif)
    h, w = photo_rgb.shape[:2]

    img = load(path)

    assert img.size == (h, w)


# --- large JPEGs decode at reduced scale -------------------------------------------------------------------


def test_big_jpeg_with_draft_decodes_smaller_but_keeps_at_least_the_requested_short_side(tmp_path):
    path = tmp_path / "huge.jpg"
    y, x = np.mgrid[0:2000, 0:3000]
    pattern = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(pattern).save(path, quality=80)

    full = load(path)
    drafted = load(path, draft_to=128)

    assert full.size == (3000, 2000)
    assert drafted.mode == "RGB"
    assert drafted.width < 3000 and drafted.height < 2000
    assert min(drafted.size) >= 128
    assert drafted.width * 2000 == drafted.height * 3000  # JPEG scales both sides alike


def test_jpeg_draft_1x_decodes_at_the_resize_side_never_below_it_and_stays_close_to_a_full_decode(tmp_path):
    path = tmp_path / "coco-sized.jpg"
    Image.fromarray(skimage.data.astronaut()).resize((640, 480), Image.Resampling.BICUBIC).save(
        path, quality=90
    )
    shared = Preprocessing("shortest", 224, 224, "bicubic", (0.5,) * 3, (0.5,) * 3, "test", "short_side_crop")
    native = replace(shared, resize_size=248, geometry="native")  # timm's crop_pct 0.9 margin

    assert load(path, draft_to=shared.resize_size).size == (320, 240)  # libjpeg's 1/2 DCT scale
    assert load(path, draft_to=native.resize_size).size == (640, 480)  # 1/2 would be below 248: full decode
    full, _ = decode_for_encoder(path, shared, TransformSpec(), 16, 10**9, "torch", "2x")
    drafted, _ = decode_for_encoder(path, shared, TransformSpec(), 16, 10**9, "torch", "1x")
    mse = np.mean((full.astype(float) - drafted.astype(float)) ** 2)
    assert drafted.shape == full.shape == (224, 224, 3)
    assert 35 < 10 * np.log10(255**2 / mse) < 60  # another decode of the same photo, not the same pixels


@pytest.mark.parametrize(
    ("size", "save"),
    [((640, 480), {"quality": 90}), ((500, 375), {"quality": 75, "subsampling": 0}),
     ((1000, 750), {"quality": 95, "subsampling": 1}), ((333, 500), {"quality": 85, "progressive": True}),
     ((1203, 907), {"quality": 90, "optimize": True})],
)  # fmt: skip
def test_the_fast_jpeg_decoder_gives_pils_pixels_at_pils_draft_scale(tmp_path, size, save, monkeypatch):
    import simplejpeg

    calls = []
    decode = simplejpeg.decode_jpeg
    monkeypatch.setattr(simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(k) or decode(*a, **k))
    path = tmp_path / "photo.jpg"
    Image.fromarray(skimage.data.coffee()).resize(size, Image.Resampling.BICUBIC).save(path, **save)
    for draft_to in (None, 100, 128, 224, 256, 448):
        fast = load_rgb_array(path, min_side=MIN_SIDE, max_pixels=MAX_PIXELS, draft_to=draft_to)
        np.testing.assert_array_equal(fast, np.asarray(load(path, draft_to=draft_to)), err_msg=str(draft_to))
    assert len(calls) == 6  # every decode took the fast path
    shared = Preprocessing("shortest", 224, 224, "bicubic", (0.5,) * 3, (0.5,) * 3, "test", "short_side_crop")
    for resize in ("torch", "pil"):
        for transform in (TransformSpec(), TransformSpec(name="swap_rb")):
            pixels, reason = decode_for_encoder(path, shared, transform, MIN_SIDE, MAX_PIXELS, resize, "2x")
            reference = np.asarray(load(path, draft_to=448))
            reference = reference if transform.name == "identity" else apply_transform(reference, transform)
            np.testing.assert_array_equal(pixels, shared.to_pixels(Image.fromarray(reference), resize))
            assert reason == ""


def test_jpegs_the_fast_decoder_does_not_take_go_through_pil(tmp_path, photo_rgb):
    rotated, gray, cut = tmp_path / "rotated.jpg", tmp_path / "gray.jpg", tmp_path / "cut.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(photo_rgb).save(rotated, exif=exif)
    Image.fromarray(photo_rgb).convert("L").save(gray)
    Image.fromarray(photo_rgb).save(cut, quality=90)
    cut.write_bytes(cut.read_bytes()[:-200])
    for path in (rotated, gray):
        np.testing.assert_array_equal(
            load_rgb_array(path, min_side=MIN_SIDE, max_pixels=MAX_PIXELS), np.asarray(load(path))
        )
    assert load_rgb_array(rotated, min_side=MIN_SIDE, max_pixels=MAX_PIXELS).shape == (120, 100, 3)  # upright
    with pytest.raises(ImageSkipped, match="truncated"):  # simplejpeg refuses it; PIL says why
        load_rgb_array(cut, min_side=MIN_SIDE, max_pixels=MAX_PIXELS)


# --- pixel-space transforms ---------------------------------------------------------------------------------


def test_identity_transform_returns_the_pixels_unchanged(photo_rgb):
    np.testing.assert_array_equal(apply_transform(photo_rgb, TransformSpec()), photo_rgb)


def test_swap_rb_swaps_red_and_blue_and_applied_twice_gives_back_the_image(photo_rgb):
    swap = TransformSpec(name="swap_rb")

    once = apply_transform(photo_rgb, swap)
    twice = apply_transform(once, swap)

    np.testing.assert_array_equal(once[..., 0], photo_rgb[..., 2])
    np.testing.assert_array_equal(once[..., 1], photo_rgb[..., 1])
    np.testing.assert_array_equal(once[..., 2], photo_rgb[..., 0])
    np.testing.assert_array_equal(twice, photo_rgb)
    assert once.flags["C_CONTIGUOUS"]


def test_scale_channel_scales_only_that_channel_rounds_and_clips_to_uint8(photo_rgb):
    original = photo_rgb.copy()

    halved = apply_transform(photo_rgb, TransformSpec(name="scale_channel", channel="g", alpha=0.5))
    tripled = apply_transform(photo_rgb, TransformSpec(name="scale_channel", channel="g", alpha=3.0))

    assert halved.dtype == tripled.dtype == np.uint8
    np.testing.assert_array_equal(halved[..., 1], np.round(photo_rgb[..., 1] * 0.5).astype(np.uint8))
    np.testing.assert_array_equal(tripled[..., 1], np.minimum(photo_rgb[..., 1].astype(int) * 3, 255))
    for out in (halved, tripled):
        np.testing.assert_array_equal(out[..., [0, 2]], photo_rgb[..., [0, 2]])
    np.testing.assert_array_equal(photo_rgb, original)  # the input is not modified


def test_grayscale_gives_bt601_luma_in_three_equal_channels(photo_rgb):
    primaries = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0]]], np.uint8)

    gray_primaries = apply_transform(primaries, TransformSpec(name="grayscale"))
    gray_photo = apply_transform(photo_rgb, TransformSpec(name="grayscale"))

    # 0.299 * 255 = 76.2, 0.587 * 255 = 149.7, 0.114 * 255 = 29.1
    np.testing.assert_array_equal(gray_primaries[0, :, 0], [76, 150, 29, 255, 0])
    for out in (gray_primaries, gray_photo):
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out[..., 0], out[..., 1])
        np.testing.assert_array_equal(out[..., 0], out[..., 2])


# --- encoder resize / crop ----------------------------------------------------------------------------------


def preprocessing(resize_mode: str, resize_size: int, crop_size: int, interpolation: str = "bicubic"):
    return Preprocessing(
        resize_mode=resize_mode,
        resize_size=resize_size,
        crop_size=crop_size,
        interpolation=interpolation,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        source="test",
    )


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
@pytest.mark.parametrize("orientation", ["landscape", "portrait"])
def test_to_pixels_gives_square_uint8_of_crop_size_for_a_non_square_photo(
    photo_rgb, resize_mode, orientation
):
    pixels_in = (
        photo_rgb if orientation == "landscape" else np.ascontiguousarray(photo_rgb.transpose(1, 0, 2))
    )
    assert pixels_in.shape[0] != pixels_in.shape[1]

    pixels = preprocessing(resize_mode, 36, 32).to_pixels(Image.fromarray(pixels_in))

    assert pixels.shape == (32, 32, 3)
    assert pixels.dtype == np.uint8


def three_bands(width_per_band: int, height: int) -> Image.Image:
    """A wide image: red | green | blue bands, side by side."""
    bands = np.zeros((height, 3 * width_per_band, 3), dtype=np.uint8)
    for i in range(3):
        bands[:, i * width_per_band : (i + 1) * width_per_band, i] = 255
    return Image.fromarray(bands)


def test_shortest_mode_keeps_the_aspect_and_centre_crops_so_a_wide_image_loses_its_sides():
    wide = three_bands(width_per_band=32, height=32)
    tall = wide.transpose(Image.Transpose.ROTATE_90)
    shortest = preprocessing("shortest", 32, 32, "nearest")

    for img in (wide, tall):
        pixels = shortest.to_pixels(img)
        assert (pixels == (0, 255, 0)).all()  # only the middle (green) band survives the centre crop


def test_squash_mode_resizes_both_sides_so_a_wide_image_keeps_all_its_content():
    pixels = preprocessing("squash", 32, 32, "nearest").to_pixels(three_bands(width_per_band=32, height=32))

    np.testing.assert_array_equal(pixels[16, 0], (255, 0, 0))
    np.testing.assert_array_equal(pixels[16, 16], (0, 255, 0))
    np.testing.assert_array_equal(pixels[16, 31], (0, 0, 255))


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_torch_resize_is_pils_filter_within_one_level(resize_mode, interpolation):
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((640, 480))  # COCO-sized, landscape
    for img in (photo, photo.transpose(Image.Transpose.ROTATE_90)):
        spec = preprocessing(resize_mode, 248, 224, interpolation)
        by_pil, by_torch = spec.to_pixels(img, "pil"), spec.to_pixels(img, "torch")
        assert by_torch.shape == by_pil.shape == (224, 224, 3) and by_torch.dtype == np.uint8
        difference = np.abs(by_torch.astype(int) - by_pil)
        assert difference.max() <= 1 and (difference > 0).mean() < 0.02  # same filter, rounding apart
        assert by_torch.flags.writeable


def test_torch_resize_leaves_filters_it_lacks_to_pil():
    wide = three_bands(width_per_band=32, height=32)
    spec = preprocessing("shortest", 32, 32, "nearest")
    np.testing.assert_array_equal(spec.to_pixels(wide, "torch"), spec.to_pixels(wide, "pil"))


def test_normalisation_made_first_under_inference_mode_still_trains():
    """The mean and std are made once per device (on a GPU, a tensor made from Python numbers waits for all queued
    work); the encode stage makes them first, under inference mode, and training's losses must still get
    gradients through them."""
    import torch

    pre = Preprocessing(
        "shortest", 8, 8, "bicubic", (0.41, 0.42, 0.43), (0.21, 0.22, 0.23), "test", "short_side_crop"
    )
    pixels = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    with torch.inference_mode():
        expected = (
            pixels.permute(0, 3, 1, 2) / 255.0 - torch.tensor([0.41, 0.42, 0.43]).view(1, 3, 1, 1)
        ) / (torch.tensor([0.21, 0.22, 0.23]).view(1, 3, 1, 1))
        torch.testing.assert_close(pre.normalize(pixels), expected)
    weight = torch.nn.Parameter(torch.ones(()))
    (
        pre.denormalize(pre.normalize(pixels) * weight).sum() + (pre.normalize(pixels) * weight).sum()
    ).backward()
    assert weight.grad is not None and torch.isfinite(weight.grad)
