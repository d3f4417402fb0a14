"""The embedded `demo` dataset: a real COCO-format folder built from the photos that ship inside scikit-image.

Seeded random crops and flips of a dozen photos give a few hundred distinct images with a caption each, split
into train and val. Built once, deterministically, with no download. Val crops come from the same photos as the
train crops, so demo scores are optimistic; the demo shows the pipeline, not a benchmark.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

# file in skimage/data -> caption of the whole photo
PHOTOS = {
    "astronaut.png": "an astronaut in a white spacesuit in front of an american flag",
    "chelsea.png": "a tabby cat looking to the side",
    "coffee.png": "a cup of coffee on a saucer with a spoon",
    "rocket.jpg": "a rocket on a launch pad under a blue sky",
    "motorcycle_left.png": "a red motorcycle parked in a garage",
    "hubble_deep_field.jpg": "galaxies of many colours in deep space",
    "ihc.png": "a stained tissue sample under a microscope",
    "retina.jpg": "a photograph of the back of a human eye",
    "coins.png": "old coins on a dark background",
    "camera.png": "a man with a camera on a tripod",
    "brick.png": "a brick wall",
    "grass.png": "a close-up of green grass",
    "gravel.png": "a close-up of grey gravel",
    "color.png": "a colour test pattern",
    "moon.png": "the surface of the moon",
    "page.png": "a scanned page of printed text",
}
N_TRAIN, N_VAL = 256, 64
VAL_ID_OFFSET = 1_000_000  # ids stay unique across splits
MAX_SIDE = 192


def build(root: Path, seed: int = 0, n_train: int = N_TRAIN, n_val: int = N_VAL) -> Path:
    """Write the demo dataset under `root` unless it is already there; return `root`."""
    root = Path(root)
    if (root / "annotations" / "captions_val.json").is_file():
        return root
    import skimage

    photo_dir = Path(skimage.__file__).parent / "data"
    photos = [(name, Image.open(photo_dir / name).convert("RGB")) for name in PHOTOS]
    rng = np.random.default_rng(seed)
    root.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a killed build never leaves a half dataset behind.
    tmp = Path(tempfile.mkdtemp(prefix=".demo-building-", dir=root.parent))
    try:
        (tmp / "annotations").mkdir()
        for split, n_images, id_offset in (("train", n_train, 0), ("val", n_val, VAL_ID_OFFSET)):
            (tmp / split).mkdir()
            images, annotations = [], []
            for i in range(n_images):
                image_id = id_offset + i + 1
                name, photo = photos[int(rng.integers(len(photos)))]
                crop, flipped, box = _random_crop(photo, rng)
                file_name = f"{image_id:012d}.jpg"
                crop.save(tmp / split / file_name, quality=90)
                images.append(
                    {"id": image_id, "file_name": file_name, "width": crop.width, "height": crop.height}
                )
                where = f"crop at x={box[0]}, y={box[1]}, {box[2] - box[0]}x{box[3] - box[1]} px"
                caption = f"{PHOTOS[name]} ({where}{', mirrored' if flipped else ''})"
                annotations.append({"id": image_id, "image_id": image_id, "caption": caption})
            # Like real COCO captions files: no "categories" (pycocotools then indexes captions only).
            coco = {
                "info": {"description": "reconlab demo: seeded crops of scikit-image photos", "seed": seed},
                "images": images,
                "annotations": annotations,
            }
            (tmp / "annotations" / f"captions_{split}.json").write_text(json.dumps(coco, indent=1))
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _random_crop(photo: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, bool, tuple]:
    w, h = photo.size
    area = w * h * rng.uniform(0.15, 1.0)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw = int(min(w, round(np.sqrt(area * aspect))))
    ch = int(min(h, round(np.sqrt(area / aspect))))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    box = (x0, y0, x0 + cw, y0 + ch)
    crop = photo.crop(box)
    scale = MAX_SIDE / max(cw, ch)
    if scale < 1:
        crop = crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BICUBIC)
    flipped = bool(rng.random() < 0.5)
    if flipped:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return crop, flipped, box
