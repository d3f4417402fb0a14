"""Reconstructor checkpoints as data: safetensors tensors + a JSON header; never pickles. Loading one back into a
model, checking it suits a store and that the images it is used on are held out, and running it.

A checkpoint `NAME` is `NAME.safetensors` (model weights), `NAME.json` (schema version, configs and hashes,
step, metrics, model geometry) and, for resumable ones, `NAME.train-state.safetensors` (optimiser tensors and
RNG state; the optimiser's scalars and the scheduler state live in the JSON).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.artifacts import read_json, write_json_atomic
from pipeline.config import DatasetSpec, ReconstructorConfig, SubsetSpec
from pipeline.data.datasets import image_list_sha256 as image_list_sha256_of
from pipeline.data.datasets import list_images
from pipeline.data.images import Preprocessing
from pipeline.data.store_info import ENCODER_IDENTITY, StoreInfo, check_same_encoder
from pipeline.models.reconstructor import Reconstructor
from pipeline.provenance import file_sha256
from storage import FeatureStore, StoreError, open_store

SCHEMA_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, of another schema, or made for other features."""


def training_run_of(checkpoint: Path) -> Path | None:
    """The training run a reconstructor checkpoint belongs to (the train stage writes `<run>/checkpoints/<name>.json`);
    None for a checkpoint kept anywhere else."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


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
        record = read_json(result)
        if not isinstance(record, dict) or "checkpoint" not in record:
            raise CheckpointError(f"{result}: not a finished training run's record")
        path = Path(record["checkpoint"])
    json_path = (
        path if path.suffix == ".json" else path.with_name(path.name.removesuffix(".safetensors") + ".json")
    )
    if not json_path.is_file():
        raise CheckpointError(f"{path}: checkpoint header {json_path.name} not found")
    try:
        header = json.loads(json_path.read_text())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{json_path}: not a readable checkpoint header ({e})") from None
    if not isinstance(header, dict) or header.get("schema_version") != SCHEMA_VERSION:
        header = header if isinstance(header, dict) else {}
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


def damage(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be loaded (its header or weights file missing, or weights other than the ones its
    header names), or None. The weights' SHA-256 is cached per file size and mtime."""
    from pipeline.models.weights import file_sha256_cached

    try:
        header = read_header(checkpoint)
        weights = Path(header["_json_path"]).with_suffix(".safetensors")
        stat = weights.stat()
    except CheckpointError as e:
        return str(e)
    except FileNotFoundError:
        return f"{weights}: weights file missing"
    if file_sha256_cached(str(weights), stat.st_size, stat.st_mtime_ns) != header.get("weights_sha256"):
        return f"{weights}: SHA-256 differs from the one its header names"
    return None


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


def load_reconstructor(checkpoint: Path, device: str | torch.device = "cpu") -> tuple[Reconstructor, dict]:
    """A checkpoint (its .json or .safetensors) -> the model in eval mode and the checkpoint header. Everything the
    header and the weights file claim is checked before any memory is allocated for the model."""
    header = read_header(Path(checkpoint))
    model = _meta_model(header)  # shapes only, no memory
    path = Path(header["_json_path"]).with_suffix(".safetensors")
    _check_tensors_match(path, model)
    model = model.to_empty(device="cpu")
    load_weights(header, model)
    return model.to(device).eval(), header


_GEOMETRY_LIMITS = {"in_dim": 65536, "patch_size": 64, "out_size": 4096}


def _meta_model(header: dict) -> Reconstructor:
    where = header["_json_path"]
    geometry = header.get("model")
    if not isinstance(geometry, dict):
        raise CheckpointError(f"{where}: header has no 'model' geometry")
    try:
        # checkpoints made before layer_norm_eps was recorded were trained with 1e-5
        cfg = ReconstructorConfig.model_validate(
            {"layer_norm_eps": 1e-5}
            | {k: v for k, v in geometry.items() if k in ReconstructorConfig.model_fields}
        )
    except ValueError as e:
        raise CheckpointError(
            f"{where}: model geometry out of bounds: {' '.join(str(e).split())[:300]}"
        ) from None
    dims = {k: geometry.get(k) for k in _GEOMETRY_LIMITS}
    grid = geometry.get("grid_hw")
    ok = all(isinstance(v, int) and 0 < v <= _GEOMETRY_LIMITS[k] for k, v in dims.items())
    ok = (
        ok
        and isinstance(grid, list)
        and len(grid) == 2
        and all(isinstance(g, int) and 0 < g <= 256 for g in grid)
    )
    if not ok:
        raise CheckpointError(
            f"{where}: model geometry {dims | {'grid_hw': grid}} is missing or out of bounds"
        )
    with torch.device("meta"):
        return Reconstructor(cfg, dims["in_dim"], tuple(grid), dims["patch_size"], dims["out_size"])


def _check_tensors_match(path: Path, model: torch.nn.Module) -> None:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: weights file missing")
    try:
        with safe_open(str(path), "pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e}); reconlab never loads pickles") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if stored != expected:
        missing, extra = sorted(expected.keys() - stored.keys()), sorted(stored.keys() - expected.keys())
        shapes = [k for k in expected.keys() & stored.keys() if expected[k] != stored[k]]
        raise CheckpointError(f"{path}: tensors do not fit the model its header describes (missing {missing[:3]}, "
                              f"unexpected {extra[:3]}, other shapes {shapes[:3]})")  # fmt: skip


def check_checkpoint_matches_store(header: dict, store: FeatureStore) -> None:
    expected, got = header["encoder"], StoreInfo.of(store).encoder_identity
    diff = [k for k in ENCODER_IDENTITY if expected.get(k) != got[k]]
    if diff:
        details = "; ".join(f"{k}: checkpoint {expected.get(k)!r}, store {got[k]!r}" for k in diff)
        raise CheckpointError(
            f"checkpoint {header['_json_path']} was trained on features of encoder '{expected['name']}', "
            f"store {store.path.name} differs ({details})"
        )


class DisjointnessError(ValueError):
    """Images that trained or selected a reconstructor would be scored by it (an evaluation leak)."""


def image_files(store: FeatureStore) -> np.ndarray | None:
    """The resolved path of each of the store's images (row order), listed again from the dataset the store
    records; None where that dataset cannot be listed here or no longer lists the images the store encoded."""
    info = StoreInfo.of(store)
    if info.dataset_source is None:
        return None
    key = info.key
    return _listed_files(
        json.dumps(info.dataset_source, sort_keys=True),
        key["dataset"]["split"],
        json.dumps(key["subset"], sort_keys=True),
        key["image_list_sha256"],
    )


def _listed_files(source: str, split: str, subset: str, image_list_sha256: str) -> np.ndarray | None:
    # every encoder's stores list the same splits: their files are resolved once, not per encoder
    key = (source, split, subset, image_list_sha256)
    if key in _listings:
        return _listings[key]
    try:
        records = list_images(
            DatasetSpec.model_validate_json(source), split, SubsetSpec.model_validate_json(subset)
        )
    # the dataset moved or its files changed (a ConfigError is a ValueError): not kept, it may be back later
    except (ValueError, OSError, KeyError):
        return None
    if image_list_sha256_of(records) != image_list_sha256:
        return None
    _listings[key] = np.array([str(r.path.resolve()) for r in records])
    return _listings[key]


_listings: dict[tuple, np.ndarray] = {}


def _same_images(a: FeatureStore, a_rows: np.ndarray, b: FeatureStore) -> tuple[np.ndarray, str]:
    """The names of `a`'s rows that are images among `b`'s valid ones. Where both datasets can be listed: the same
    file, or the same id and file name (a copy of the dataset elsewhere: COCO's ids are unique across its splits),
    not the same id alone (custom datasets number each split's images from 1: equal ids, other images). Else the
    same image id, said to be by id."""
    a_files, b_files = image_files(a), image_files(b)
    b_valid = b.valid()
    if a_files is None or b_files is None:
        return np.intersect1d(a.image_ids()[a_rows], b.image_ids()[b_valid]), "ids"
    same_file = np.intersect1d(a_files[a_rows], b_files[b_valid])
    names = {Path(f).name for f in same_file}
    a_keys = {(int(i), Path(f).name) for i, f in zip(a.image_ids()[a_rows], a_files[a_rows], strict=True)}
    b_keys = {(int(i), Path(f).name) for i, f in zip(b.image_ids()[b_valid], b_files[b_valid], strict=True)}
    return np.array(sorted(names | {name for _, name in a_keys & b_keys})), "files"


def _examples(same: np.ndarray, by: str) -> str:
    if by == "files":
        return f"e.g. files {same[:5].tolist()}"
    return f"e.g. ids {same[:5].tolist()}; by id, as the datasets could not be listed here to compare their files"


def check_held_out(store: FeatureStore, rows: np.ndarray, header: dict, scored: str) -> None:
    """Refuse to score images that trained or selected the reconstructor (the paper's validity condition)."""
    roles = {"trained": header["train_store"]}
    if header.get("selected_on_store"):
        roles["selected"] = header["selected_on_store"]
    for role, path in roles.items():
        try:
            shaping = open_store(path, require_complete=False)
        except StoreError as e:
            raise DisjointnessError(
                f"cannot check that the images are held out from checkpoint {header['_json_path']}: the store "
                f"that {role} it is unreadable ({e})"
            ) from None
        same, by = _same_images(store, rows, shaping)
        if same.size:
            fix = "score a split that R never saw (evaluate.split / operators.split)"
            if role == "selected":
                fix += ", or train with train.select_checkpoint: last"
            raise DisjointnessError(
                f"{scored}: {same.size} of its images {role} the reconstructor (store {Path(path).name}), "
                f"{_examples(same, by)}; {fix}"
            )


def study_rows(
    train: FeatureStore, held_out: FeatureStore, header: dict, n_images: int | None, field: str
) -> np.ndarray:
    """The held-out rows a study (token utility, SAE) scores: the first `n_images` valid ones, after checking both
    stores come from one encoder, the reconstructor suits them, and no held-out image is in the train store or
    trained or selected the reconstructor. `field` names the split setting in errors (e.g. "tokens.split 'val'")."""
    check_same_encoder(StoreInfo.of(train), StoreInfo.of(held_out))
    check_checkpoint_matches_store(header, held_out)
    rows = np.flatnonzero(held_out.valid())
    rows = rows[:n_images] if n_images else rows
    same, by = _same_images(held_out, rows, train)
    if same.size:
        raise DisjointnessError(
            f"{field}: {same.size} of its images are in the train store {train.path.name} ({_examples(same, by)}); "
            "evaluate on a split the study's networks never saw"
        )
    check_held_out(held_out, rows, header, field)
    return rows


@torch.no_grad()
def reconstruct(
    model: Reconstructor, features_nhwd: np.ndarray | torch.Tensor, preprocessing: Preprocessing
) -> np.ndarray:
    """Features [B, H, W, D] -> reconstructed RGB images, uint8 [B, S, S, 3]."""
    device = next(model.parameters()).device
    return preprocessing.to_uint8_nhwc(model(torch.as_tensor(features_nhwd, device=device)))
