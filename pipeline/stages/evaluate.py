"""Evaluate stage: score held-out reconstructions per image, compare encoders with paired statistics, rank them.

Per image and encoder: judge-encoder cosine similarity between the original and the reconstruction (pooled
image embeddings; grayscale and/or colour, recorded), and pixel metrics at a common resolution. Scores are cached
per (store, checkpoint, scoring config) as long-format parquet (image_id, encoder, judge, metric, value) so later
comparisons never recompute them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import artifacts, bars, stop
from pipeline.artifacts import WriteLock
from pipeline.config import ConfigError, EvaluateConfig, canonical_json, config_hash
from pipeline.data.store_info import StoreInfo, open_encoded
from pipeline.jobs import EvalTarget
from pipeline.models import checkpoints, encoders
from pipeline.models import judges as judges_mod
from pipeline.models.checkpoints import (
    check_checkpoint_matches_store,
    check_held_out,
    load_reconstructor,
    reconstruct,
    training_run_of,
)
from pipeline.models.judges import load as load_judges  # noqa: F401 (the stage's entry point for its judges)
from pipeline.provenance import provenance
from pipeline.report.layerwise import layerwise
from pipeline.science import metrics, stats
from storage import open_store

PIXEL_JUDGE = "pixels"


def _lpips_model():
    """LPIPS when its package and weights are on this machine; else (None, reason)."""
    try:
        import lpips  # noqa: F401
    except ImportError:
        return None, "LPIPS skipped: the `lpips` package is not installed"
    try:
        return lpips.LPIPS(net="alex", verbose=False).eval(), ""
    except Exception as e:  # weights are fetched from the network on first use
        return None, f"LPIPS skipped: its weights are not available locally ({type(e).__name__})"


def score_key(store, header: dict, judges: dict, cfg: EvaluateConfig) -> dict:
    return {
        **_key_without_judges(store, header, cfg),
        "judges": {name: j.weights_id for name, j in judges.items()},
        "judge_preprocessing": {name: j.preprocessing.to_dict() for name, j in judges.items()},
    }


def _key_without_judges(store, header: dict, cfg: EvaluateConfig) -> dict:
    return {
        "store": StoreInfo.of(store).digest,
        "checkpoint": header["config_hash"],
        "checkpoint_weights_sha256": checkpoints.weights_sha256(header),
        "judge_modes": cfg.judge_modes,
        "judge_input_resolution": cfg.judge_input_resolution,
        "pixel_resolution": cfg.pixel_resolution,
        "n_images": cfg.n_images,
        "lpips": cfg.lpips,
    }


def scores_found(encoder_name: str, store, header: dict, cfg: EvaluateConfig) -> Path | None:
    """The finished scores a run would read, or None. For `reconlab plan`, which loads no model: judges match by
    name (a run re-scores if their weights changed); of several matches, the newest."""
    want = _key_without_judges(store, header, cfg)
    found = []
    for meta_path in (Path(cfg.output_root) / "scores").glob(f"{encoder_name}__*.json"):
        key = (artifacts.finished(meta_path) or {}).get("key", {})
        if (all(key.get(k) == v for k, v in want.items()) and set(key.get("judges", {})) == set(cfg.judge_names())
                and meta_path.with_suffix(".parquet").is_file()):  # fmt: skip
            found.append(meta_path.with_suffix(".parquet"))
    return max(found, key=lambda path: path.stat().st_mtime, default=None)


def report_dir(score_files: list[Path], cfg: EvaluateConfig) -> tuple[dict, Path]:
    """The report's key (its score files and statistics settings) and the folder that key names."""
    stats_cfg = cfg.model_dump(
        mode="json", include={"n_boot", "n_permutations", "alternative", "alpha", "seed", "comparisons"}
    )
    key = {"scores": [f.stem for f in score_files], "stats": stats_cfg}
    # the ranking it leads with: the first judge's first mode (the scores hold every judge and mode)
    if cfg.judges:
        key["primary"] = [cfg.judge_names()[0], cfg.judge_modes[0]]
    return key, artifacts.folder(cfg.output_root, "report", key)


def score_encoder(
    target: EvalTarget, judges: dict, cfg: EvaluateConfig, *, progress: bool = False
) -> tuple[pd.DataFrame, Path, list[str]]:
    """Per-image scores of one encoder's reconstructions (cached parquet); returns (scores, parquet path, meta).

    meta holds the score key (store and checkpoint hashes, judges, settings), notes and provenance."""
    store = open_encoded(target.store)
    model, header = load_reconstructor(target.checkpoint, device=encoders.resolve_device(cfg.device))
    check_checkpoint_matches_store(header, store)
    rows = np.flatnonzero(store.valid())
    rows = rows[: cfg.n_images] if cfg.n_images else rows
    image_ids = store.image_ids()[rows]
    check_held_out(store, rows, header, f"evaluate split '{cfg.split}' of {target.encoder_name}")
    key = score_key(store, header, judges, cfg)
    out = artifacts.folder(Path(cfg.output_root) / "scores", target.encoder_name, key, ".parquet")
    meta_path = out.with_suffix(".json")
    with WriteLock(out):  # two runs never score one encoder at once: the second waits, then reads the first's
        meta = artifacts.finished(meta_path)
        if out.is_file() and meta is not None:  # the meta file is written last: it marks the scores done
            return pd.read_parquet(out), out, meta
        return _score(target, judges, cfg, store, model, rows, image_ids, key, out, meta_path, progress)


def _score(target, judges, cfg, store, model, rows, image_ids, key, out, meta_path, progress):
    """Score `target` under its lock (score_encoder): the parquet, then its meta record, which marks it done."""
    pre = StoreInfo.of(store).preprocessing
    lpips_model, lpips_note = _lpips_model() if cfg.lpips else (None, "")
    records: list[pd.DataFrame] = []
    bar = bars.bar(total=len(rows), unit="img", desc=f"score {target.encoder_name}", disable=not progress)
    for start in range(0, len(rows), cfg.batch_size):
        stop.check()  # scores are written once, whole: a rerun scores again
        idx, ids = rows[start : start + cfg.batch_size], image_ids[start : start + cfg.batch_size]
        originals = store.pixels(idx)
        recons = reconstruct(model, store.features(idx), pre)
        o01 = judges_mod.resize(originals, cfg.pixel_resolution).astype(np.float32) / 255
        r01 = judges_mod.resize(recons, cfg.pixel_resolution).astype(np.float32) / 255
        values = {
            (PIXEL_JUDGE, "mse"): np.mean((o01 - r01) ** 2, axis=(1, 2, 3)),
            (PIXEL_JUDGE, "psnr_db"): metrics.psnr_db(o01, r01),
            (PIXEL_JUDGE, "ssim"): metrics.ssim(o01, r01),
        }
        if lpips_model is not None:
            to_t = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2) * 2 - 1  # noqa: E731
            with torch.no_grad():
                values[(PIXEL_JUDGE, "lpips")] = lpips_model(to_t(o01), to_t(r01)).flatten().numpy()
        for name, judge in judges.items():
            for mode in cfg.judge_modes:
                values[(name, f"cosine_{mode}")] = judges_mod.cosines(
                    judge, originals, recons, mode == "grayscale", cfg.judge_input_resolution
                )
        for (judge_name, metric), v in values.items():
            records.append(pd.DataFrame({"image_id": ids, "encoder": target.encoder_name, "judge": judge_name,
                                         "metric": metric, "value": np.asarray(v, float)}))  # fmt: skip
        bar.update(len(idx))
    bar.close()
    scores = pd.concat(records, ignore_index=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    scores.to_parquet(tmp := out.with_name(f".{out.name}.tmp"), index=False)
    tmp.replace(out)
    notes = [lpips_note] if lpips_note else []
    meta = artifacts.finish(meta_path, key, {"store": str(target.store), "checkpoint": str(target.checkpoint),
                                             "notes": notes})  # fmt: skip
    return scores, out, meta


def headline_pairs(names: list[str]) -> list[tuple[str, str]]:
    """The paper's table: SigLIP vs SigLIP2 at each resolution both were evaluated at."""
    return [
        (n, n.replace("siglip-", "siglip2-", 1))
        for n in names
        if n.startswith("siglip-") and n.replace("siglip-", "siglip2-", 1) in names
    ]


def score_columns(scores: pd.DataFrame) -> list[tuple[str, str]]:
    """(judge, metric) pairs where higher is better (MSE and LPIPS are excluded from rankings)."""
    keys = scores[["judge", "metric"]].drop_duplicates().itertuples(index=False)
    return [(j, m) for j, m in keys if m not in ("mse", "lpips")]


def comparison_pairs(names: list[str], cfg: EvaluateConfig) -> list[tuple[str, str, str]]:
    """(a, b, alternative) for every comparison: the configured ones (default: every pair), plus the headline."""
    if cfg.comparisons:
        unknown = sorted({n for c in cfg.comparisons for n in (c.a, c.b)} - set(names))
        if unknown:
            raise ValueError(
                f"evaluate.comparisons name encoder(s) {unknown} that are not evaluated; evaluated: {names}"
            )
        pairs = [(c.a, c.b, c.alternative or cfg.alternative) for c in cfg.comparisons]
    else:
        pairs = [(a, b, cfg.alternative) for a, b in combinations(names, 2)]
    for a, b in headline_pairs(names):
        if not any({a, b} == {p[0], p[1]} for p in pairs):
            pairs.append((a, b, cfg.alternative))
    return pairs


def analyse(scores: pd.DataFrame, cfg: EvaluateConfig) -> dict:
    """Comparisons (Holm per score), rankings and the headline table from per-image scores. Every encoder is
    ranked on the same images: those scored for all of them (a mean over other images would not compare)."""
    names = list(dict.fromkeys(scores["encoder"]))
    scores, image_note = _on_common_images(scores, names)
    pairs = comparison_pairs(names, cfg)
    comparisons, rankings = {}, {}
    for judge, metric in score_columns(scores):
        subset = scores[(scores.judge == judge) & (scores.metric == metric)]
        per_encoder = {n: subset[subset.encoder == n].set_index("image_id")["value"] for n in names}
        family = stats.compare_family(per_encoder, pairs, cfg.n_boot, cfg.seed, cfg.n_permutations)
        comparisons[(judge, metric)] = family
        rankings[(judge, metric)] = stats.ranking(per_encoder, family, cfg.n_boot, cfg.seed, cfg.alpha)
    return {
        **_analysis(names, pairs, comparisons, rankings, cfg),
        "notes": [image_note] if image_note else [],
    }


def layer_groups(targets: list[EvalTarget]) -> dict[str, list[tuple[str, int]]]:
    """Evaluated encoders that are feature layers of one network (same model, weights, input and preprocessing),
    two or more per group, shallowest first: {label: [(encoder name, depth)]}."""
    groups: dict[str, list[tuple[str, int]]] = {}
    for t in targets:
        info = StoreInfo.of(open_store(t.store))
        if info.depth is not None:
            groups.setdefault(canonical_json(info.network), []).append((t.encoder_name, info.depth))
    out = {}
    for members in (sorted(m, key=lambda m: m[1]) for m in groups.values() if len(m) > 1):
        bases = {re.sub(r"\.(L-\d+|last)$", "", name) for name, _ in members}
        out[bases.pop() if len(bases) == 1 else " / ".join(name for name, _ in members)] = members
    return out


def _scored_ids(scores: pd.DataFrame) -> dict[str, set]:
    """Per encoder, its images with a finite value in every judge and metric (NaN or inf counts as unscored)."""
    unscored = scores[~np.isfinite(scores["value"].to_numpy(float))]
    return {n: set(group) - set(unscored.image_id[unscored.encoder == n])
            for n, group in scores.groupby("encoder", sort=False)["image_id"]}  # fmt: skip


def _on_common_images(scores: pd.DataFrame, names: list[str]) -> tuple[pd.DataFrame, str]:
    ids = _scored_ids(scores)
    common = set.intersection(*ids.values())
    if not common:
        raise ConfigError(
            f"no image was scored for every encoder ({', '.join(names)}): they cannot be ranked"
        )
    if all(len(v) == len(common) for v in ids.values()) and len(common) == scores.image_id.nunique():
        return scores, ""
    counts = ", ".join(f"{n} {len(ids[n])}" for n in names)
    return scores[scores.image_id.isin(common)], (
        f"encoders were scored on different images ({counts}; a NaN or inf score counts as unscored): rankings "
        f"and comparisons use the {len(common)} images scored for every encoder"
    )


def _analysis(names, pairs, comparisons: dict, rankings: dict, cfg: EvaluateConfig) -> dict:
    headline = [
        {"judge": j, "metric": m, **c.to_dict()}
        for (j, m), family in comparisons.items()
        if j != PIXEL_JUDGE
        for c in family
        if {c.a, c.b} in [set(p) for p in headline_pairs(names)]
    ]
    primary = (cfg.judge_names()[0], f"cosine_{cfg.judge_modes[0]}") if cfg.judges else None
    if primary not in rankings:  # no judge scores: fall back to the first pixel score
        primary = next(iter(rankings))
    return {"names": names, "pairs": pairs, "comparisons": comparisons, "rankings": rankings, "headline": headline,
            "primary": primary}  # fmt: skip


def _cached_analysis(out_dir: Path, record: dict, cfg: EvaluateConfig) -> dict:
    """The analysis of a finished report, read back from its CSVs (nothing is recomputed)."""
    table = pd.read_csv(out_dir / "comparisons.csv")
    comparisons = {
        (j, m): [
            stats.PairedComparison(**row)
            for row in group.drop(columns=["judge", "metric"]).to_dict("records")
        ]
        for (j, m), group in table.groupby(["judge", "metric"], sort=False)
    }
    rankings = {}
    for path in sorted(out_dir.glob("ranking__*.csv")):
        ranking = pd.read_csv(path, keep_default_na=False)
        rankings[(ranking["judge"].iloc[0], ranking["metric"].iloc[0])] = ranking.drop(
            columns=["judge", "metric"]
        )
    pairs = [tuple(p) for p in record["pairs"]]
    analysis = _analysis(record["names"], pairs, comparisons, rankings, cfg)
    for name in ("means", "tests"):
        path = out_dir / f"layerwise_{name}.csv"
        analysis[f"layer_{name}"] = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    return analysis


@dataclass(frozen=True)
class EvaluateResult:
    report_md: Path
    report_html: Path
    score_files: list[Path]
    analysis: dict
    already_complete: bool = False  # the same scores and settings made this report before: it was read


def run(
    targets: list[EvalTarget],
    cfg: EvaluateConfig,
    judges: dict[str, encoders.Encoder],
    *,
    progress: bool = True,
) -> EvaluateResult:
    """Score every target (cached) with the loaded judges, analyse, and write the report; returns where it is."""

    if len(targets) < 2:
        raise ConfigError("evaluation compares encoders: give at least two")
    inputs = [path for t in targets for path in (t.store, training_run_of(t.checkpoint))]
    with artifacts.reading(*inputs):
        return _scores_and_report(targets, cfg, judges, progress)


def _scores_and_report(
    targets: list[EvalTarget], cfg: EvaluateConfig, judges: dict, progress: bool
) -> EvaluateResult:
    frames, files, notes, inputs = [], [], [], []
    for t in targets:
        scores, path, meta = score_encoder(t, judges, cfg, progress=progress)
        frames.append(scores)
        files.append(path)
        notes += [f"{t.encoder_name}: {n}" for n in meta["notes"]]
        store_digest = meta["key"]["store"]
        inputs.append({"encoder": t.encoder_name, "store": str(t.store), "store_hash": store_digest["config_hash"],
                       "store_content_sha256": store_digest["content_sha256"][:16],
                       "checkpoint": str(t.checkpoint), "checkpoint_config_hash": meta["key"]["checkpoint"],
                       "scores": str(path)})  # fmt: skip
    key, out_dir = report_dir(files, cfg)
    with WriteLock(out_dir):  # a second run waits, then finds this one's report
        return _report(out_dir, key, frames, files, notes, inputs, targets, cfg, judges)


def report_finished(out_dir: Path) -> dict | None:
    """The report's result record when it and its two documents are written; else None."""
    whole = all((out_dir / name).is_file() for name in ("report.md", "report.html"))
    return artifacts.finished(out_dir / artifacts.RESULT) if whole else None


def _report(out_dir: Path, key: dict, frames, files, notes, inputs, targets, cfg, judges):
    from pipeline.report import report

    done = report_finished(out_dir)
    if done is not None:  # same score files, same statistics settings: the report stands
        return EvaluateResult(
            out_dir / "report.md", out_dir / "report.html", files, _cached_analysis(out_dir, done, cfg), True
        )
    scores = pd.concat(frames, ignore_index=True)
    analysis = analyse(scores, cfg)
    analysis["layer_means"], analysis["layer_tests"] = layerwise(
        scores[scores.image_id.isin(set.intersection(*_scored_ids(scores).values()))],
        layer_groups(targets),
        analysis["rankings"],
        cfg,
    )
    notes += analysis["notes"]
    for c in (c for family in analysis["comparisons"].values() for c in family):
        if c.n_only_a or c.n_only_b:
            notes.append(f"{c.a} vs {c.b}: {c.n_only_a} image(s) only in {c.a}, {c.n_only_b} only in {c.b}; "
                         "compared on the common images")  # fmt: skip
    notes = list(dict.fromkeys(notes))
    prov = provenance()
    header = {"report_hash": config_hash(key), **key["stats"],
              "judges": ", ".join(f"{n} ({j.weights_id[:40]})" for n, j in judges.items()),
              "judge_modes": ", ".join(cfg.judge_modes), "pixel_resolution": cfg.pixel_resolution,
              "git_commit": prov["git_commit"], "reconlab_version": prov["reconlab_version"]}  # fmt: skip
    md, html_path = report.write(out_dir, scores, analysis, targets, pd.DataFrame(inputs), notes, cfg, header)
    for (judge, metric), ranking in analysis["rankings"].items():
        ranking.assign(judge=judge, metric=metric).to_csv(
            out_dir / f"ranking__{judge}__{metric}.csv", index=False
        )
    rows = [
        {"judge": j, "metric": m, **c.to_dict()}
        for (j, m), fam in analysis["comparisons"].items()
        for c in fam
    ]
    pd.DataFrame(rows).to_csv(out_dir / "comparisons.csv", index=False)
    if len(analysis["layer_means"]):
        analysis["layer_means"].to_csv(out_dir / "layerwise_means.csv", index=False)
        analysis["layer_tests"].to_csv(out_dir / "layerwise_tests.csv", index=False)
    artifacts.finish(
        out_dir / artifacts.RESULT, key, {"names": analysis["names"], "pairs": analysis["pairs"]}
    )
    return EvaluateResult(md, html_path, files, analysis)
