"""What listing a COCO-sized split costs `reconlab plan`: plan.build for a config of several encoders on a
COCO-format split of 118,287 images with 5 captions each (the size of COCO 2017 train's captions file; the
pixels are not needed to plan), each listing parsed anew (as before 2026-11-28) against the annotations parsed
once per unchanged file, in one process. Run from the repository root:
    .venv/bin/python benchmarks/plan_listing.py [--encoders 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from pipeline import plan
from pipeline.config import RunConfig
from pipeline.data import datasets

N_IMAGES = 118_287
ENCODERS = ["tiny-vit-64", "tiny-vit-112", "tiny-vit-64-gray", "tiny-cnn-64"]


class _Forgetful(dict):
    """A listing cache that never finds what it holds: every listing parses the file, as before."""

    def __contains__(self, key):
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--encoders", type=int, default=4, choices=range(1, len(ENCODERS) + 1))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        (root / "annotations").mkdir()
        ids = range(1, N_IMAGES + 1)
        (root / "annotations" / "captions.json").write_text(json.dumps({
            "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": 640, "height": 480} for i in ids],
            "annotations": [{"id": 5 * i + k, "image_id": i, "caption": f"A photo {i} of thing {k} on a table."}
                            for i in ids for k in range(5)],
        }))  # fmt: skip
        split = {"images_dir": "images", "annotations": "annotations/captions.json"}
        cfg = RunConfig.model_validate({
            "store_root": str(root / "stores"), "splits": ["train", "val"],
            "dataset": {"name": "coco-sized", "kind": "coco", "root": str(root), "splits": {"train": split, "val": split}},
            "encoders": ENCODERS[: args.encoders],
        })  # fmt: skip
        kept = datasets._coco_listings
        times = {}
        for label, cache in (("parsed at every listing (before)", _Forgetful()), ("parsed once (now)", {})):
            datasets._coco_listings = cache
            start = time.perf_counter()
            run = plan.build(cfg)
            times[label] = time.perf_counter() - start
        datasets._coco_listings = kept
    print(
        f"plan.build, {args.encoders} encoders x 2 splits, {len(run.encode)} stores, {N_IMAGES:,} images per split"
    )
    print("| listing | seconds | ratio |\n|---|---|---|")
    base = times["parsed at every listing (before)"]
    for label, s in times.items():
        print(f"| {label} | {s:.1f} | {base / s:.1f}x |")


if __name__ == "__main__":
    main()
