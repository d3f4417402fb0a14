"""A plan's checks before its first expensive step: splits held out from what they score (by name and by image
file), weights present, study settings the encoders can hold, finished stores the later stages can read, output
folders writable. Each refusal is a ConfigError (or a weights error, StoreError) naming the field and the fix."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from pipeline.config import ConfigError, EncoderSpec
from pipeline.data.datasets import list_images
from pipeline.data.store_info import check_finite
from pipeline.models import model_ids, weights
from pipeline.plan import STAGES, STUDIES, RunPlan
from pipeline.stages import sae, tokens
from storage import StoreError, open_store


def preflight(
    run: RunPlan, stages: tuple[str, ...] = STAGES, check_folders: bool = True, load_weights: bool = True
) -> None:
    """Everything `stages` of this plan will need, checked before the first expensive step: weights of every
    encoder and judge (present; and, with `load_weights`, loadable into their models where they will run: seconds
    per model), writable output folders (made if missing; not with `check_folders=False`), enough held-out
    images for the operator fits, and evaluation, operators and studies on images no reconstructor or study
    network trained on or was selected on (by split name and by image file). Raises ConfigError (or
    a weights error) naming the field and the fix."""
    cfg = run.cfg
    shaped = {cfg.train.train_split} | (
        {cfg.train.val_split} if cfg.train.select_checkpoint == "best_val" else set()
    )
    role = (
        "trains" if cfg.evaluate.split == cfg.train.train_split else "selects (select_checkpoint: best_val)"
    )
    if "evaluate" in stages and run.evaluate and cfg.evaluate.split in shaped:
        raise ConfigError(f"evaluate.split '{cfg.evaluate.split}' is the split that {role} the reconstructors: "
                          "scores must come from held-out images; set evaluate.split to another split")  # fmt: skip
    if "evaluate" in stages:
        if len(run.evaluate) < 2:
            raise ConfigError(f"evaluation compares encoders, this run evaluates {len(run.evaluate)} "
                              f"({', '.join(run.evaluate) or 'none'}): name two or more in encoders / evaluate.encoders")  # fmt: skip
        for judge in run.judges:
            if not judge.keep_head:
                raise ConfigError(f"evaluate.judges: '{judge.name}' must set keep_head: true (judges score pooled "
                                  "image embeddings)")  # fmt: skip
    if "operators" in stages and run.operators:
        if cfg.operators.split in shaped:
            raise ConfigError(f"operators.split '{cfg.operators.split}' is a split that trains or selects the "
                              "reconstructor; set operators.split to a held-out split")  # fmt: skip
        n_held_out = run.n_images[run.operators[0].identity_store]
        if cfg.operators.n_fit_images >= n_held_out:
            raise ConfigError(f"operators.n_fit_images {cfg.operators.n_fit_images} leaves no test images: split "
                              f"'{cfg.operators.split}' has {n_held_out}; set it below {n_held_out}")  # fmt: skip
    for stage in [s for s in STUDIES if s in stages and run.studies[s]]:
        split = getattr(cfg, stage).split
        if split in shaped:
            raise ConfigError(f"{stage}.split '{split}' is a split that trains or selects the reconstructor; "
                              f"set {stage}.split to a held-out split")  # fmt: skip
    if "sae" in stages and cfg.sae and cfg.sae.inputs == "tokens":  # the embeddings' width: at the stage
        for step in run.studies["sae"]:
            spec = run.encode[step.train_store].encoder
            width = model_ids.feature_width(spec)
            if width:
                sae.sae_training.check_dictionary(cfg.sae, width, f"encoder '{spec.name}'")
    if (
        "sae" in stages
        and run.studies["sae"]
        and cfg.sae.inputs == "embeddings"
        and not cfg.encode.embeddings
    ):
        raise ConfigError("sae.inputs: embeddings trains on the stores' image embeddings: set encode.embeddings: "
                          "true")  # fmt: skip
    for step in run.studies["tokens"] if "tokens" in stages else []:
        spec = run.encode[step.train_store].encoder
        tokens.check_fractions(cfg.tokens, spec.name, spec.grid)
    judge = run.tokens_judge
    if "tokens" in stages and run.studies["tokens"] and judge is not None and not judge.keep_head:
        raise ConfigError(f"tokens.judge: '{judge.name}' must set keep_head: true (judges score pooled image "
                          "embeddings)")  # fmt: skip
    specs = {job.encoder.name: job.encoder for job in run.encode.values()}
    judges = [*(run.judges if "evaluate" in stages else []),
              *([run.tokens_judge] if "tokens" in stages and run.studies["tokens"] and run.tokens_judge else [])]  # fmt: skip
    for spec in [*specs.values(), *judges]:
        weights.check_available(spec)
    roots = {"encode": ("store_root", cfg.store_root), "train": ("train.output_root", cfg.train.output_root),
             "operators": ("operators.output_root", cfg.operators.output_root),
             "evaluate": ("evaluate.output_root", cfg.evaluate.output_root)}  # fmt: skip
    for stage in [s for s in STUDIES if getattr(cfg, s)]:
        roots[stage] = (f"{stage}.output_root", getattr(cfg, stage).output_root)
    _check_held_out_files(run, stages, shaped)
    to_encode = {}
    # a finished store the later stages would refuse: refused before the stages before them
    for path, job in run.encode.items():
        try:
            store = open_store(path, require_complete=False)
        except StoreError:  # not written yet, or damaged: the encode stage says which
            to_encode[job.encoder.name] = job.encoder
            continue
        if store.complete:
            check_finite(store)
        else:
            to_encode[job.encoder.name] = job.encoder
    for stage in [s for s in stages if s in roots]:
        if stage != "encode" or to_encode:  # finished stores are read from a read-only cache too
            _check_writable(*roots[stage], make=check_folders)
    if load_weights:
        _check_weights_load([*to_encode.values(), *judges])


def _check_weights_load(specs: list[EncoderSpec]) -> None:
    """Load the weights of every encoder that will run (one at a time, on the CPU, then dropped): a damaged file or
    a checkpoint of another model fails here, not after hours of encoding other encoders. Seeded random inits
    cannot fail this way and are skipped."""
    from pipeline.models import encoders

    for spec in {s.name: s for s in specs if s.weights != "random"}.values():
        encoders.load(spec, device="cpu")


def _check_held_out_files(run: RunPlan, stages: tuple[str, ...], shaped: set[str]) -> None:
    """No image file of a held-out split is also in a split that trains or selects what scores it: split names
    differ, but two splits' annotations may list the same files (under other ids)."""
    cfg = run.cfg
    held_out = {}  # field -> (split, the splits that shape what scores it)
    if "evaluate" in stages and run.evaluate:
        held_out["evaluate.split"] = (cfg.evaluate.split, shaped)
    if "operators" in stages and run.operators:
        held_out["operators.split"] = (cfg.operators.split, shaped)
    for stage in [s for s in STUDIES if s in stages and run.studies[s]]:
        study = getattr(cfg, stage)
        held_out[f"{stage}.split"] = (study.split, shaped | {study.train_split})
    listed: dict[str, dict[str, str]] = {}

    def files(split: str) -> dict[str, str]:
        if split not in listed:
            records = list_images(cfg.dataset, split, cfg.subset)
            listed[split] = {str(r.path.resolve()): r.path.name for r in records}
        return listed[split]

    for field_name, (split, shaping) in held_out.items():
        for other in sorted(shaping - {split}):
            same = sorted(files(split).keys() & files(other).keys())
            if same:
                names = ", ".join(files(split)[f] for f in same[:3])
                raise ConfigError(
                    f"{field_name} '{split}': {len(same)} of its image files are also in split '{other}', whose "
                    f"images train or select what scores them (e.g. {names}); scores must come from held-out "
                    f"images: remove them from one split's annotations or choose another {field_name}"
                )


def _check_writable(field_name: str, root: Path, make: bool = True) -> None:
    """The folder `root` exists (made if `make`) and takes a file; without `make` (for `plan`, which writes
    nothing), its nearest existing folder must be one we may write in."""
    root = Path(root).absolute()
    why = None
    if make:
        try:
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=root):
                pass
        except OSError as e:  # EEXIST / ENOTDIR: mkdir of a path that is, or runs through, a file
            why = (
                "a file is in the way: it must be a folder"
                if e.errno in (errno.EEXIST, errno.ENOTDIR)
                else e.strerror
            )
    else:
        existing = next(p for p in (root, *root.parents) if p.exists())
        if not existing.is_dir():
            why = "a file is in the way: it must be a folder"
        elif not os.access(existing, os.W_OK | os.X_OK):
            why = f"{existing} is not writable"
    if why:
        raise ConfigError(
            f"{field_name} {root}: cannot write there ({why}); make it a writable folder or set {field_name} to one"
        )
