"""Epoch checkpoints of the small networks trained from stores (token selectors, sparse autoencoders): weights,
optimiser and RNG state every epoch, so a killed run resumes and, on CPU, ends bit-identical to an uninterrupted
one; a metrics.csv row per epoch; and a `final` checkpoint (weights + header) usable on its own."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from pipeline.models import checkpoints


def resume(
    out_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config_hash: str
) -> tuple[int, int]:
    """(first epoch to run, steps done) after loading the last epoch checkpoint in `out_dir`, if any; one made by
    another config is refused."""
    epochs = sorted(out_dir.glob("epoch-*.json"))
    if not epochs:
        return 0, 0
    saved = checkpoints.read_header(epochs[-1])
    if saved.get("config_hash") != config_hash:
        raise checkpoints.CheckpointError(
            f"{epochs[-1]}: made by config {saved.get('config_hash')}, this run is {config_hash}"
        )
    checkpoints.load_weights(saved, model)
    checkpoints.load_train_state(saved, optimizer, None)
    return saved["epoch"] + 1, saved["step"]


def save_epoch(out_dir: Path, model, optimizer, header: dict, metrics: dict) -> None:
    """Checkpoint epoch `metrics['epoch']` (keeping only the latest), then append its metrics row."""
    epoch = metrics["epoch"]
    checkpoints.save(out_dir, f"epoch-{epoch:04d}", model, header | {"epoch": epoch, "step": metrics["step"],
                     "metrics": metrics}, optimizer)  # fmt: skip
    for old in sorted(out_dir.glob("epoch-*.json"))[:-1]:
        for f in out_dir.glob(old.stem + ".*"):
            f.unlink()
    append_csv(out_dir / "metrics.csv", metrics)


def append_csv(path: Path, row: dict) -> None:
    """One row of a metrics CSV, the header first when the file is new."""
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def save_final(out_dir: Path, model, header: dict) -> Path:
    """The finished network as checkpoint `final` (no optimiser state), with the last epoch's metrics."""
    last = checkpoints.read_header(sorted(out_dir.glob("epoch-*.json"))[-1])
    return checkpoints.save(
        out_dir, "final", model, header | {k: last[k] for k in ("epoch", "step", "metrics")}
    )
