"""Reconstructor checkpoints as data: safetensors tensors + a JSON header; never pickles.

A checkpoint `NAME` is `NAME.safetensors` (model weights), `NAME.json` (schema version, configs and hashes,
step, metrics, model geometry) and, for resumable ones, `NAME.train-state.safetensors` (optimiser tensors and
RNG state; the optimiser's scalars and the scheduler state live in the JSON).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.artifacts import write_json_atomic
from pipeline.provenance import file_sha256

SCHEMA_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, of another schema, or made for other features."""


def _atomic_save_file(tensors: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def save(
    directory: Path,
    name: str,
    model: torch.nn.Module,
    header: dict,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
) -> Path:
    """Write checkpoint `name` under `directory`; the JSON goes last, so a JSON on disk means a whole checkpoint."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_save_file(weights, directory / f"{name}.safetensors")
    header = {"schema_version": SCHEMA_VERSION, **header,
              "weights_sha256": file_sha256(directory / f"{name}.safetensors")}  # fmt: skip
    if optimizer is not None:
        state = optimizer.state_dict()
        tensors = {"rng.torch": torch.get_rng_state()}
        scalars: dict = {}
        for param_id, param_state in state["state"].items():
            for key, value in param_state.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{param_id}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{param_id}.{key}"] = value
        _atomic_save_file(tensors, directory / f"{name}.train-state.safetensors")
        header["optimizer"] = {"param_groups": state["param_groups"], "scalars": scalars}
        header["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    write_json_atomic(directory / f"{name}.json", header)
    return directory / f"{name}.json"


def read_header(path: Path) -> dict:
    """A checkpoint's header from its .json, its .safetensors, or a finished training run folder (the checkpoint
    its result.json names)."""
    path = Path(path)
    if path.is_dir():
        result = path / "result.json"
        if not result.is_file():
            raise CheckpointError(f"{path}: not a finished training run (no result.json)")
        path = Path(json.loads(result.read_text())["checkpoint"])
    json_path = (
        path if path.suffix == ".json" else path.with_name(path.name.removesuffix(".safetensors") + ".json")
    )
    if not json_path.is_file():
        raise CheckpointError(f"{path}: checkpoint header {json_path.name} not found")
    header = json.loads(json_path.read_text())
    if header.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(
            f"{json_path}: checkpoint schema {header.get('schema_version')!r}, this reconlab reads {SCHEMA_VERSION}"
        )
    header["_json_path"] = str(json_path)
    return header


def weights_sha256(header: dict) -> str:
    """Identity of a checkpoint's weights: the SHA-256 its header names (checked against the file on load)."""
    if "weights_sha256" not in header:
        raise CheckpointError(f"{header['_json_path']}: header names no weights SHA-256 (made by an older reconlab); "
                              "re-train to use it")  # fmt: skip
    return header["weights_sha256"]


def load_weights(header: dict, model: torch.nn.Module) -> None:
    """Load the checkpoint's weights into `model` after checking the file is the one its header names."""
    path = Path(header["_json_path"]).with_suffix(".safetensors")
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file missing")
    if file_sha256(path) != weights_sha256(header):
        raise CheckpointError(
            f"{path}: SHA-256 differs from the one its header {Path(header['_json_path']).name} names: the weights "
            "file was replaced or damaged; re-train or restore it"
        )
    model.load_state_dict(load_file(str(path)))


def load_train_state(header: dict, optimizer: torch.optim.Optimizer, scheduler) -> None:
    json_path = Path(header["_json_path"])
    tensors = load_file(str(json_path.with_name(json_path.stem + ".train-state.safetensors")))
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, param_id, name = key.split(".", 2)
            state.setdefault(int(param_id), {})[name] = value
    for key, value in header["optimizer"]["scalars"].items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    groups = [
        {**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in header["optimizer"]["param_groups"]
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    if scheduler is not None and header.get("scheduler") is not None:
        scheduler.load_state_dict(header["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
