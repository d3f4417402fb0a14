"""The run plan: a run config expanded into the work of every stage — each store, training run and operator fit
with the folder its identity names and whether it is done — without running or loading anything heavy.
`reconlab plan --config FILE` prints it; `reconlab run` prints it before starting.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.artifacts import WriteLock, read_json
from pipeline.config import ConfigError, RunConfig, TransformSpec
from pipeline.config_files import resolve_encoder
from pipeline.models import encoders
from pipeline.models.checkpoints import CheckpointError, read_header
from pipeline.stages import encode, operators, train
from storage import StoreError, open_store


@dataclass(frozen=True)
class Step:
    stage: str  # encode | train | operators | evaluate
    encoder: str
    what: str  # split and transform, pair, ...
    state: str  # cached | partial (...) | to run | after <stage>
    path: str  # where the artifact lives ('' until its inputs exist)


def jobs_from_config(cfg: RunConfig, config_path: Path | None, encoder_names: list[str] | None = None):
    """Every (split, encoder, transform) store a run config asks for, optionally only some encoders."""
    specs = [resolve_encoder(ref, config_path) for ref in cfg.encoders]
    if encoder_names:
        unknown = set(encoder_names) - {s.name for s in specs}
        specs += [resolve_encoder(name, config_path) for name in sorted(unknown)]
        specs = [s for s in specs if s.name in encoder_names]
    for spec in specs:  # a wrong architecture fails now, not after hours of other encoders
        encoders.check_architecture(spec)
    return [
        encode.EncodeJob(
            cfg.store_root, cfg.dataset, split, cfg.subset, spec, transform, cfg.store, cfg.encode
        )
        for spec in specs
        for split in cfg.splits
        for transform in cfg.transforms
    ]


def encode_jobs(cfg: RunConfig, config_path: Path | None) -> list[encode.EncodeJob]:
    """Every store the run needs: splits x transforms per encoder, plus f(T x) on the operators' split."""
    jobs = jobs_from_config(cfg, config_path)
    for name in operator_encoders(cfg, jobs):
        base = next(j for j in jobs if j.encoder.name == name and j.transform == TransformSpec())
        for pair in (p for spec in cfg.operators.pairs for p in spec.expand()):
            for transform in (TransformSpec(), pair.transform):
                job = replace(base, split=cfg.operators.split, transform=transform)
                if job not in jobs:
                    jobs.append(job)
    return jobs


def operator_encoders(cfg: RunConfig, jobs: list[encode.EncodeJob]) -> list[str]:
    return cfg.operators.encoders or [jobs[0].encoder.name]


def store_state(path: Path) -> str:
    if not (path / "zarr.json").is_file():
        return "to run"
    try:
        store = open_store(path, require_complete=False)
    except StoreError:
        return "to run (unreadable; recreated)"
    if store.complete:
        return "cached"
    done = store.shard_done()
    return f"partial ({int(done.sum())}/{done.size} shards)"


def plan(cfg: RunConfig, config_path: Path | None = None, with_operators: bool = True) -> list[Step]:
    steps: list[Step] = []
    stores: dict[tuple[str, str, str], Path] = {}
    jobs = encode_jobs(cfg, config_path)
    for job in jobs:
        path = encode.plan(job)[2]
        stores[(job.encoder.name, job.split, job.transform.tag)] = path
        steps.append(
            Step("encode", job.encoder.name, f"{job.split} {job.transform.tag}", store_state(path), str(path))
        )
    done_stores = {k for k, p in stores.items() if store_state(p) == "cached"}
    identity_tag = TransformSpec().tag
    checkpoints: dict[str, Path] = {}
    for name in dict.fromkeys(job.encoder.name for job in jobs):
        inputs = [(name, cfg.train.train_split, identity_tag), (name, cfg.train.val_split, identity_tag)]
        if not all(k in done_stores for k in inputs):
            steps.append(Step("train", name, cfg.train.train_split, "after encode", ""))
            continue
        job = train.TrainJob(stores[inputs[0]], stores[inputs[1]], cfg.train)
        _, run_dir = train.key_and_run_dir(job, open_store(job.train_store), open_store(job.val_store))
        result = read_json(run_dir / "result.json")
        if result is not None:
            checkpoints[name] = Path(result["checkpoint"])
            state = "cached"
        else:
            epochs = sorted((run_dir / "checkpoints").glob("epoch-*.json"))
            last = int(epochs[-1].stem.removeprefix("epoch-")) + 1 if epochs else 0
            state = f"partial ({last}/{cfg.train.epochs} epochs)" if epochs else "to run"
        steps.append(Step("train", name, cfg.train.train_split, state, str(run_dir)))
    if with_operators:
        steps += _operator_steps(cfg, operator_encoders(cfg, jobs), stores, done_stores, checkpoints)
    for name in dict.fromkeys(s.encoder for s in steps if s.stage == "train"):
        if cfg.evaluate.encoders and name not in cfg.evaluate.encoders:
            continue
        ready = name in checkpoints and (name, cfg.evaluate.split, identity_tag) in done_stores
        steps.append(Step("evaluate", name, f"scores on {cfg.evaluate.split}",
                          "runs (scores re-used when cached)" if ready else "after train", str(cfg.evaluate.output_root)))  # fmt: skip
    return steps


def _operator_steps(
    cfg: RunConfig, names: list[str], stores: dict, done_stores: set, checkpoints: dict
) -> list[Step]:
    steps = []
    ops = cfg.operators
    for name in names:
        for pair in (p for spec in ops.pairs for p in spec.expand()):
            what = f"{pair.transform.tag} {pair.direction}"
            inputs = [(name, ops.split, TransformSpec().tag), (name, ops.split, pair.transform.tag)]
            if name not in checkpoints or not all(k in done_stores for k in inputs):
                steps.append(
                    Step(
                        "operators",
                        name,
                        what,
                        "after train" if name not in checkpoints else "after encode",
                        "",
                    )
                )
                continue
            job = operators.OperatorJob(stores[inputs[0]], stores[inputs[1]], pair, checkpoints[name], ops)
            try:
                header = read_header(job.checkpoint)
                _, out_dir = operators.fit_key_and_dir(
                    job, open_store(job.identity_store), open_store(job.transform_store), header
                )
            except (CheckpointError, StoreError) as e:
                steps.append(Step("operators", name, what, f"to run (inputs: {e})", ""))
                continue
            state = "cached" if read_json(out_dir / "result.json") is not None else "to run"
            steps.append(Step("operators", name, what, state, str(out_dir)))
    return steps


STAGES = ("encode", "train", "operators", "evaluate")


def force(cfg: RunConfig, config_path: Path | None, stage: str) -> list[Path]:
    """Remove the artifacts of `stage` and of every stage after it, so the next run redoes them; returns what was
    removed. Each artifact's lock is taken first: one being written elsewhere is refused, not deleted."""
    if stage not in STAGES:
        raise ConfigError(f"--force: unknown stage '{stage}'; stages: {', '.join(STAGES)}")
    doomed = STAGES[STAGES.index(stage) :]
    steps = plan(cfg, config_path)
    removed = []
    for step in steps:
        if step.stage in doomed and step.stage != "evaluate" and step.path and Path(step.path).exists():
            with WriteLock(Path(step.path)):
                shutil.rmtree(step.path)
            removed.append(Path(step.path))
    if "evaluate" in doomed:
        evaluated = {
            s.path for s in steps if s.stage == "encode" and s.what == f"{cfg.evaluate.split} identity"
        }
        for meta_path in sorted((Path(cfg.evaluate.output_root) / "scores").glob("*.json")):
            meta = read_json(meta_path)
            if meta is not None and meta.get("store") in evaluated:
                for f in (meta_path, meta_path.with_suffix(".parquet")):
                    f.unlink(missing_ok=True)
                removed.append(meta_path.with_suffix(".parquet"))
    return removed
