"""What produced an artifact: package versions, git commit, time. Recorded in every store and checkpoint."""

from __future__ import annotations

import datetime as dt
import subprocess
from importlib import metadata
from pathlib import Path

import pipeline
from storage.format import file_sha256  # noqa: F401 (one SHA-256 of a file, re-exported)

_PACKAGES = ("torch", "timm", "transformers", "zarr", "numcodecs", "numpy", "pillow", "simplejpeg", "dask",
             "prefect")  # fmt: skip


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str:
    repo = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def provenance() -> dict:
    return {
        "reconlab_version": pipeline.__version__,
        "git_commit": git_commit(),
        "package_versions": package_versions(),
        "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
