"""What a wheel install gets: the packages and the configs the demo needs (they live in top-level configs/)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_carries_the_demo_config_and_every_encoder_spec(tmp_path):
    pytest.importorskip("setuptools", reason="building the wheel without isolation needs setuptools")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        check=True, cwd=tmp_path,
    )  # fmt: skip
    names = zipfile.ZipFile(next(tmp_path.glob("reconlab-*.whl"))).namelist()
    specs = {p.name for p in (ROOT / "configs" / "encoders").glob("*.yaml")}
    assert "pipeline/configs/demo.yaml" in names and "pipeline/configs/coco.yaml" in names
    assert {Path(n).name for n in names if n.startswith("pipeline/configs/encoders/")} == specs
    assert {n.split("/")[0] for n in names if n.endswith(".py")} == {"flows", "pipeline", "storage"}
