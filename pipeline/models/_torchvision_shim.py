"""Let `import timm` and transformers' image processors work where torchvision's C extension cannot load.

On the CPU development machines torch 2.13.0 is a CPU wheel but the only torchvision 0.28.0 is a CUDA build whose
`_C` library fails to load; `import torchvision` then dies with `operator torchvision::nms does not exist`.
Registering the op schemas it checks for is enough for the pure-Python parts timm and transformers use (reconlab
decodes images with PIL). Where torchvision's library loads (a normal GPU install) this does nothing.
"""

from __future__ import annotations

import importlib.util
import sys

_fragments: list = []  # keeps the Library objects (and so the registrations) alive


def install() -> None:
    if _fragments or "torchvision" in sys.modules:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    import os

    import torch

    for lib_dir in spec.submodule_search_locations:
        for candidate in sorted(os.listdir(lib_dir)):
            if candidate.startswith("_C") and candidate.endswith((".so", ".pyd")):
                try:
                    torch.ops.load_library(f"{lib_dir}/{candidate}")
                    return
                except (OSError, RuntimeError):
                    pass
    fragment = torch.library.Library("torchvision", "FRAGMENT")
    fragment.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    fragment.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _fragments.append(fragment)
