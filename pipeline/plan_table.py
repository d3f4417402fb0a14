"""The run plan as a table: every step of a run config with the folder its artifact's identity names and whether
it is done (cached, partial, to run, after an earlier stage), computed without running anything heavy or loading a
model — what `reconlab plan` prints and `reconlab run` shows before starting — and `force`, which removes a stage's
artifacts and those that use them."""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import WriteLock, read_json
from pipeline.config import ConfigError, RunConfig
from pipeline.models.checkpoints import CheckpointError, read_header
from pipeline.plan import STAGES, STUDIES, OperatorStep, RunPlan, StudyStep, build
from pipeline.stages import evaluate, operators, sae, tokens, train
from storage import StoreError, open_store


@dataclass(frozen=True)
class Step:
    stage: str  # encode | train | operators | evaluate
    encoder: str
    what: str  # split and transform, pair, ...
    state: str  # cached | partial (...) | to run | after <stage>
    path: str  # where the artifact lives ('' until its inputs exist)


def store_state(path: Path) -> str:
    if not (path / "zarr.json").is_file():
        return "to run"
    try:
        store = open_store(path, require_complete=False)
    except StoreError:
        return "to run (unreadable; recreated)"
    if store.complete:
        damaged = store.damaged_shards()
        return f"partial ({len(damaged)} damaged shard(s) to re-encode)" if damaged else "cached"
    done = store.shard_done()
    return f"partial ({int(done.sum())}/{done.size} shards)"


def plan(
    cfg: RunConfig, config_path: Path | None = None, with_operators: bool = True, run: RunPlan | None = None
) -> list[Step]:
    """`run`: the plan of `cfg` already built (listing a dataset is not free)."""
    run = run or build(cfg, config_path)
    states = {path: store_state(path) for path in run.encode}
    steps = [
        Step("encode", job.encoder.name, f"{job.split} {job.transform.tag}", states[path], str(path))
        for path, job in run.encode.items()
    ]
    checkpoints: dict[str, Path] = {}
    for name, job in run.train.items():
        if not all(states[p] == "cached" for p in (job.train_store, job.val_store)):
            steps.append(Step("train", name, cfg.train.train_split, "after encode", ""))
            continue
        _, run_dir = train.key_and_run_dir(job, open_store(job.train_store), open_store(job.val_store))
        result = read_json(run_dir / "result.json")
        if result is not None and train.damaged(result) is None:
            checkpoints[name] = Path(result["checkpoint"])
            state = "cached"
        elif result is not None:
            state = "partial (a checkpoint is damaged: trains again)"
        else:
            epochs = sorted((run_dir / "checkpoints").glob("epoch-*.json"))
            last = int(epochs[-1].stem.removeprefix("epoch-")) + 1 if epochs else 0
            state = f"partial ({last}/{cfg.train.epochs} epochs)" if epochs else "to run"
        steps.append(Step("train", name, cfg.train.train_split, state, str(run_dir)))
    if with_operators:
        steps += [_operator_step(cfg, op, states, checkpoints) for op in run.operators]
    if run.evaluate:
        steps += _evaluate_steps(cfg, run, states, checkpoints)
    steps += [
        row
        for stage in STUDIES
        for step in run.studies[stage]
        for row in _study_steps(run, step, states, checkpoints)
    ]
    return steps


def _evaluate_steps(cfg: RunConfig, run: RunPlan, states: dict, checkpoints: dict) -> list[Step]:
    """A row per encoder's scores, and one for the report made from them all."""
    steps, score_files = [], []
    for name, store in run.evaluate.items():
        what = f"scores on {cfg.evaluate.split}"
        if states[store] != "cached" or name not in checkpoints:
            waits_for = "encode" if states[store] != "cached" else "train"
            steps.append(Step("evaluate", name, what, f"after {waits_for}", ""))
            continue
        try:
            header = read_header(checkpoints[name])
            found = evaluate.scores_found(name, open_store(store), header, cfg.evaluate)
        except (CheckpointError, StoreError) as e:
            found, state, path = None, f"to run (inputs: {e})", ""
        else:
            state, path = (
                ("cached", found) if found else ("to run", Path(cfg.evaluate.output_root) / "scores")
            )
        score_files.append(found)
        steps.append(Step("evaluate", name, what, state, str(path)))
    what = f"report of {len(run.evaluate)} encoders"
    if len(score_files) < len(run.evaluate) or None in score_files:
        return [*steps, Step("evaluate", "", what, "after scores", "")]
    _, report_dir = evaluate.report_dir(score_files, cfg.evaluate)
    state = "cached" if evaluate.report_finished(report_dir) is not None else "to run"
    return [*steps, Step("evaluate", "", what, state, str(report_dir))]


def _operator_step(cfg: RunConfig, op: OperatorStep, states: dict, checkpoints: dict) -> Step:
    what = f"{op.pair.transform.tag} {op.pair.direction}"
    if op.encoder not in checkpoints:
        return Step("operators", op.encoder, what, "after train", "")
    if not all(states[p] == "cached" for p in (op.identity_store, op.transform_store)):
        return Step("operators", op.encoder, what, "after encode", "")
    job = op.job(cfg, checkpoints[op.encoder])
    try:
        header = read_header(job.checkpoint)
        _, out_dir = operators.fit_key_and_dir(
            job, open_store(job.identity_store), open_store(job.transform_store), header
        )
    except (CheckpointError, StoreError) as e:
        return Step("operators", op.encoder, what, f"to run (inputs: {e})", "")
    state = "cached" if read_json(out_dir / "result.json") is not None else "to run"
    return Step("operators", op.encoder, what, state, str(out_dir))


def _study_steps(run: RunPlan, step: StudyStep, states: dict, checkpoints: dict) -> list[Step]:
    """Two rows per study: its trained networks, and the evaluation (scores, tests, report) that uses them."""
    study = getattr(run.cfg, step.stage)
    train_what, eval_what = f"networks on {study.train_split}", f"evaluation on {study.split}"
    if not all(states[p] == "cached" for p in (step.train_store, step.eval_store)):
        return [Step(step.stage, step.encoder, what, "after encode", "") for what in (train_what, eval_what)]
    if step.encoder not in checkpoints:
        return [Step(step.stage, step.encoder, what, "after train", "") for what in (train_what, eval_what)]
    text_rows = [Step("sae", step.encoder, f"captions of {p.name.split('__')[1]}",
                      "cached" if read_json(p / "result.json") is not None else "to run", str(p))
                 for p in (step.text_train, step.text_eval) if p is not None]  # fmt: skip
    if any(r.state != "cached" for r in text_rows):
        return [
            *text_rows,
            *(Step(step.stage, step.encoder, w, "after captions", "") for w in (train_what, eval_what)),
        ]
    job = run.study_job(step, checkpoints[step.encoder])
    try:
        stores = open_store(job.train_store), open_store(job.eval_store)
        header = read_header(job.checkpoint)
        if step.stage == "tokens":
            _, nets_dir, _, out_dir = tokens.keys_and_dirs(job, *stores, header, tokens.judge_id(job))
            names = [s.name for s in tokens.token_training.network_specs(study)]
        else:
            _, nets_dir, _, out_dir = sae.keys_and_dirs(job, *stores, header)
            names = [s.name for s in sae.sae_training.sae_specs(study)]
    except (CheckpointError, StoreError) as e:
        return [Step(step.stage, step.encoder, eval_what, f"to run (inputs: {e})", "")]
    # The networks this config asks for: one folder holds those of every config with the same networks key.
    done = sum((nets_dir / name / "final.json").is_file() for name in names)
    # a network killed mid-training has epoch checkpoints and resumes from them
    started = done or any(any((nets_dir / name).glob("epoch-*.json")) for name in names)
    nets_state = (
        "cached" if done == len(names) else f"partial ({done}/{len(names)} networks)" if started else "to run"
    )
    eval_state = "cached" if read_json(out_dir / "result.json") is not None else "to run"
    return [*text_rows, Step(step.stage, step.encoder, train_what, nets_state, str(nets_dir)),
            Step(step.stage, step.encoder, eval_what, eval_state, str(out_dir))]  # fmt: skip


def force(cfg: RunConfig, config_path: Path | None, stage: str) -> list[Path]:
    """Remove the artifacts of `stage` and of every stage that reads them, so the next run redoes them; returns
    what was removed. Each artifact's lock is taken first: one being written elsewhere is refused, not deleted."""
    if stage not in STAGES:
        raise ConfigError(f"--force: unknown stage '{stage}'; stages: {', '.join(STAGES)}")
    if stage in STUDIES and getattr(cfg, stage) is None:
        raise ConfigError(
            f"--force {stage}: this run config has no {stage}: section, so no {stage} artifacts"
        )
    # encode and train feed every later stage; operators, evaluate and the studies read only those two
    doomed = STAGES[STAGES.index(stage) :] if stage in ("encode", "train") else (stage,)
    folders = [Path(step.path) for step in plan(cfg, config_path)
               if step.stage in doomed and step.stage != "evaluate" and step.path and Path(step.path).exists()]  # fmt: skip
    scores, reports = [], []
    if "evaluate" in doomed:
        evaluated = {str(p) for p in build(cfg, config_path).evaluate.values()}
        root = Path(cfg.evaluate.output_root)
        for meta_path in sorted((root / "scores").glob("*.json")):
            meta = read_json(meta_path)
            if meta is not None and meta.get("store") in evaluated:
                scores.append(meta_path.with_suffix(".parquet"))
        stems = {path.stem for path in scores}
        for record_path in sorted(root.glob("report__*/result.json")):  # reports made from those scores
            record = read_json(record_path)
            if record is not None and stems & set(record.get("key", {}).get("scores", [])):
                reports.append(record_path.parent)
    # Every lock first: an artifact being written elsewhere refuses the whole --force, before anything is removed.
    with contextlib.ExitStack() as locks:
        for path in [*folders, *reports, *scores]:
            locks.enter_context(WriteLock(path, wait_s=0))  # refuse at once, whatever lock_wait_s says
        for folder in [*folders, *reports]:
            shutil.rmtree(folder)
        for parquet in scores:
            parquet.with_suffix(".json").unlink(missing_ok=True)
            parquet.unlink(missing_ok=True)
    return [*folders, *reports, *scores]
