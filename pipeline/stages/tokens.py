"""Token utility stage (arXiv:2503.16660): which patch tokens can be dropped because the others carry them.

Trains, on one encoder's train store, the paper's selector jointly with its completion network and, for a fair
comparison, a completion network for each baseline on masks of its own kind (random masks, MAE-style; token-norm
masks). On held-out images it keeps exactly k = round(p * tokens) tokens per method and fraction p, completes the
dropped ones (kept tokens pass through unchanged), and scores the result in feature space and, through the
encoder's trained reconstructor R, in pixels: R(completed) against R(all tokens) and against the image, and
R(kept tokens, dropped zeroed) to show what the completion adds. Paired tests per fraction (Holm across fractions),
curves, grids and a report.

Two artifacts: the trained networks (keyed by the train store and the training settings; one folder per network,
each resumable after a kill) and the evaluation (keyed by those, the held-out store, R and the judge).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline import artifacts, bars
from pipeline.artifacts import WriteLock
from pipeline.config import ConfigError, TokensConfig, config_hash
from pipeline.data.store_info import StoreInfo, open_encoded
from pipeline.jobs import TokensJob
from pipeline.models import checkpoints, judges, token_training, weights
from pipeline.models.encoders import resolve_compute_dtype, resolve_device
from pipeline.models.token_selector import completed_set, n_kept, norm_mask, random_mask, top_k_mask
from pipeline.report import tokens_report
from pipeline.science import metrics, stats
from storage import FeatureStore

NETWORKS_MARKER = "networks.json"  # the trained networks' key, written when their folder is made
SCORES = "token_scores.parquet"
# Eval-only fields: changing them re-scores but re-uses the trained networks.
_EVAL_FIELDS = ("split", "n_eval_images", "judge", "judge_input_resolution", "n_boot", "grid_fraction")


@dataclass(frozen=True)
class TokensResult:
    out_dir: Path
    networks_dir: Path
    report: Path
    already_complete: bool


def networks_key(job: TokensJob, train: FeatureStore, device: torch.device) -> dict:
    cfg = job.cfg
    fields = {k: v for k, v in artifacts.identity(cfg).items() if k not in _EVAL_FIELDS}
    if cfg.selectors == "per_fraction":
        fields.pop("fractions")  # each fraction's networks have their own folder: adding one re-uses the rest
        fields.pop("shared_fraction")
    return {"tokens": fields, "device": device.type,
            "compute_dtype": str(resolve_compute_dtype(cfg.compute_dtype, device)).removeprefix("torch."),
            "train_store": StoreInfo.of(train).digest}  # fmt: skip


def keys_and_dirs(job: TokensJob, train: FeatureStore, held_out: FeatureStore, header: dict,
                  judge_id: str | None) -> tuple[dict, Path, dict, Path]:  # fmt: skip
    device = resolve_device(job.cfg.device)
    name = StoreInfo.of(train).encoder_name
    nets_key = networks_key(job, train, device)
    nets_dir = artifacts.folder(Path(job.cfg.output_root) / "networks", name, nets_key)
    eval_key = {"networks": config_hash(nets_key), "tokens": artifacts.identity(job.cfg),
                "held_out_store": StoreInfo.of(held_out).digest, "reconstructor": header["config_hash"],
                "reconstructor_weights_sha256": checkpoints.weights_sha256(header), "judge": judge_id}  # fmt: skip
    return nets_key, nets_dir, eval_key, artifacts.folder(job.cfg.output_root, name, eval_key)


def check_fractions(cfg: TokensConfig, encoder: str, grid_hw: tuple[int, int]) -> None:
    """Every fraction keeps a token count of its own: one under half a token was evaluated as one token under its
    own label, one that rounds to every token left nothing to score as dropped, and two fractions that round alike
    were one experiment twice."""
    n = grid_hw[0] * grid_hw[1]
    kept: dict[int, float] = {}
    for p in cfg.fractions:
        if round(p * n) == 0:
            raise ConfigError(f"tokens.fractions: {p:g} keeps no token of encoder '{encoder}''s {n} (round({p:g} x "
                              f"{n}) = 0); a fraction of 1/{n} = {1 / n:.4g} keeps one")  # fmt: skip
        k = n_kept(p, n)
        # nothing dropped: the dropped tokens' scores are NaN, and it is 1.0 by another name
        if k == n and p < 1:
            raise ConfigError(f"tokens.fractions: {p:g} keeps all {n} tokens of encoder '{encoder}'; use 1.0 for "
                              f"that, or a fraction below {(n - 0.5) / n:.4g}")  # fmt: skip
        if k in kept:
            raise ConfigError(f"tokens.fractions: {kept[k]:g} and {p:g} both keep {k} of encoder '{encoder}''s {n} "
                              "tokens (one experiment twice); drop one")  # fmt: skip
        kept[k] = p


def judge_id(job: TokensJob) -> str | None:
    return weights.weights_key(job.judge) if job.judge else None


def run(job: TokensJob, *, progress: bool = False) -> TokensResult:
    """Train (or resume) the networks, then score, test and report; returns at once when finished before."""
    with artifacts.reading(job.train_store, job.eval_store, checkpoints.training_run_of(job.checkpoint)):
        return _run(job, progress)


def _run(job: TokensJob, progress: bool) -> TokensResult:
    cfg = job.cfg
    train, held_out = open_encoded(job.train_store), open_encoded(job.eval_store)
    header = checkpoints.read_header(job.checkpoint)
    nets_key, nets_dir, eval_key, out_dir = keys_and_dirs(job, train, held_out, header, judge_id(job))
    if artifacts.finished(out_dir / artifacts.RESULT) is not None:
        return TokensResult(out_dir, nets_dir, out_dir / "report.md", already_complete=True)
    rows = checkpoints.study_rows(train, held_out, header, cfg.n_eval_images, f"tokens.split '{cfg.split}'")
    judge = judges.load([job.judge], cfg.device, "tokens.judge")[job.judge.name] if job.judge else None
    networks = train_networks(job, train, nets_key, nets_dir, progress)
    with WriteLock(out_dir):
        if artifacts.finished(out_dir / artifacts.RESULT) is None:
            out_dir.mkdir(parents=True, exist_ok=True)
            scores, grid = score(job, held_out, rows, networks, judge, progress)
            scores.to_parquet(tmp := out_dir / f".{SCORES}.tmp", index=False)
            tmp.replace(out_dir / SCORES)
            tests = paired_tests(scores, cfg)
            tests.to_csv(out_dir / "tests.csv", index=False)
            inputs = [
                {"input": "train store", "path": str(job.train_store), "sha256": StoreInfo.of(train).content_sha256},
                {"input": "held-out store", "path": str(job.eval_store),
                 "sha256": StoreInfo.of(held_out).content_sha256},
                {"input": "reconstructor R", "path": str(job.checkpoint),
                 "sha256": checkpoints.weights_sha256(header)},
                {"input": "trained networks", "path": str(nets_dir), "sha256": config_hash(nets_key)},
            ]  # fmt: skip
            tokens_report.write(out_dir, scores, tests, grid, cfg, _training_table(networks), inputs,
                                eval_key, judge.spec.name if judge else None, train.layout.hidden_dim)  # fmt: skip
            artifacts.finish(out_dir / artifacts.RESULT, eval_key,
                             {"networks": str(nets_dir), "report": str(out_dir / "report.md")})  # fmt: skip
    return TokensResult(out_dir, nets_dir, out_dir / "report.md", already_complete=False)


def train_networks(job: TokensJob, train: FeatureStore, key: dict, nets_dir: Path, progress: bool) -> dict:
    """Every network the config asks for, trained or found: {NetworkSpec: final checkpoint path}."""
    cfg = job.cfg
    device = resolve_device(cfg.device)
    dtype = resolve_compute_dtype(cfg.compute_dtype, device)
    specs = token_training.network_specs(cfg)
    found = {s: nets_dir / s.name / "final.json" for s in specs}
    if all(p.is_file() for p in found.values()):
        return found
    with WriteLock(nets_dir):
        nets_dir.mkdir(parents=True, exist_ok=True)
        artifacts.write_json_atomic(nets_dir / NETWORKS_MARKER, key)
        moments = token_training.feature_moments(train)
        base = {"config": key, "config_hash": config_hash(key), "train_store": str(train.path),
                "encoder": StoreInfo.of(train).encoder_identity}  # fmt: skip
        for spec in specs:
            token_training.train_network(train, spec, cfg, nets_dir / spec.name, moments, base, device, dtype,
                                         progress)  # fmt: skip
        artifacts.finish(nets_dir / artifacts.RESULT, key, {"networks": [s.name for s in specs]})
    return found


def _training_table(networks: dict) -> pd.DataFrame:
    rows = []
    for spec, path in networks.items():
        m = json.loads(Path(path).read_text())["metrics"]
        rows.append({"network": spec.name, "method": spec.method, "target p": spec.fraction, "epochs": m["epoch"] + 1,
                     "steps": m["step"], "reconstruction loss": m["reconstruction"],
                     "kept fraction (training masks)": m["kept_fraction"]})  # fmt: skip
    return pd.DataFrame(rows)


def _network_for(networks: dict, method: str, fraction: float, cfg: TokensConfig):
    for spec, path in networks.items():
        if spec.method == method and (cfg.selectors == "shared" or spec.fraction == fraction):
            return path
    raise KeyError(f"no {method} network for p={fraction}")


@torch.no_grad()
def score(job: TokensJob, store: FeatureStore, rows: np.ndarray, networks: dict, judge, progress: bool):
    """Long-format per-image scores (image_id, fraction, method, completion, metric, value) and the grid images."""
    cfg = job.cfg
    device = resolve_device(cfg.device)
    recon_model, _ = checkpoints.load_reconstructor(job.checkpoint, device=device)
    pre = StoreInfo.of(store).preprocessing
    models = {path: token_training.load(path, device)[0] for path in set(networks.values())}
    (h, w), dim = store.layout.grid_hw, store.layout.hidden_dim
    grid_p = cfg.grid_fraction or min(cfg.fractions, key=lambda p: abs(p - 0.3))
    records, grid = [], {}
    bar = bars.bar(
        total=len(rows), unit="img", desc=f"tokens score {store.path.name[:40]}", disable=not progress
    )
    for start in range(0, len(rows), cfg.batch_size_eval):
        idx = rows[start : start + cfg.batch_size_eval]
        ids, images = store.image_ids()[idx], store.pixels(idx)
        tokens = torch.from_numpy(store.features(idx)).to(device).float().flatten(1, 2)

        def reconstruct(t: torch.Tensor, b: int = len(idx)) -> np.ndarray:
            return checkpoints.reconstruct(recon_model, t.reshape(b, h, w, dim), pre)

        def add(p: float, method: str, completion: str, values: dict, ids: np.ndarray = ids) -> None:
            records.extend({"image_id": i, "fraction": p, "method": method, "completion": completion, "metric": k,
                            "value": float(v)} for k, vs in values.items() for i, v in zip(ids, vs, strict=True))  # fmt: skip

        full = reconstruct(tokens)
        pixels_of = _pixel_scorer(images, full, judge, cfg.judge_input_resolution)
        add(1.0, "all tokens", "none", pixels_of(full, versus_full=False))
        if start == 0:
            grid |= {"images": images, "full": full, "fraction": grid_p}
        for p in cfg.fractions:
            generator = torch.Generator().manual_seed(cfg.seed * 7919 + round(p * 1e6) + start)
            for method in ("learned", "random", "norm"):
                model = models[_network_for(networks, method, p, cfg)]
                keep = select(method, model, tokens, n_kept(p, h * w), generator)
                completed = completed_set(tokens, model.complete(tokens, keep), keep)
                recon_completed, recon_zeroed = (
                    reconstruct(completed),
                    reconstruct(tokens * keep.unsqueeze(-1)),
                )
                add(
                    p,
                    method,
                    "completed",
                    _feature_scores(completed, tokens, keep) | pixels_of(recon_completed),
                )
                add(p, method, "zeroed", pixels_of(recon_zeroed))
                if p == grid_p and start == 0:
                    grid[method] = (keep.cpu().numpy().reshape(-1, h, w), recon_completed, recon_zeroed)
        bar.update(len(idx))
    bar.close()
    return pd.DataFrame.from_records(records), grid


def select(method: str, model, tokens: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Exactly k kept tokens per image: the top selector logits, k at random, or the k largest norms."""
    if method == "learned":
        return top_k_mask(model.keep_logits(tokens), k)
    if method == "random":
        return random_mask(len(tokens), tokens.shape[1], k, generator).to(tokens.device)
    return norm_mask(tokens, k)


def _feature_scores(completed: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor) -> dict:
    cosine = F.cosine_similarity(completed, tokens, dim=-1)
    dropped = 1 - keep
    n_dropped = dropped.sum(dim=1)
    return {
        "feature_cosine": cosine.mean(dim=1).cpu().numpy(),
        # nan where nothing was dropped (p = 1): no dropped token to score
        "feature_cosine_dropped": ((cosine * dropped).sum(dim=1) / n_dropped).cpu().numpy(),
        "feature_mse": ((completed - tokens) ** 2).mean(dim=(1, 2)).cpu().numpy(),
    }


def _pixel_scorer(images: np.ndarray, full: np.ndarray, judge, judge_input_resolution: int | None):
    """Scores of a reconstruction against the image (PSNR, SSIM, judge cosine) and against R(all tokens)."""
    images01, full01 = images.astype(np.float32) / 255, full.astype(np.float32) / 255

    def scores(recon: np.ndarray, versus_full: bool = True) -> dict:
        r01 = recon.astype(np.float32) / 255
        out = {"psnr_db": metrics.psnr_db(images01, r01), "ssim": metrics.ssim(images01, r01)}
        if judge is not None:
            out["judge_cosine"] = judges.cosines(judge, images, recon, True, judge_input_resolution)
        if versus_full:
            out |= {
                "psnr_vs_full_db": metrics.psnr_db(full01, r01),
                "ssim_vs_full": metrics.ssim(full01, r01),
            }
        return out

    return scores


TESTED = ("feature_cosine_dropped", "psnr_vs_full_db", "psnr_db", "judge_cosine")


def paired_tests(scores: pd.DataFrame, cfg: TokensConfig) -> pd.DataFrame:
    """Learned vs each baseline, completed sets, per fraction and metric; two-sided; Holm across fractions."""
    completed = scores[scores.completion == "completed"]
    rows = []
    for metric in [m for m in TESTED if m in set(completed.metric)]:
        of = completed[completed.metric == metric]
        series = {
            f"{m}@{p:g}": g.set_index("image_id")["value"] for (m, p), g in of.groupby(["method", "fraction"])
        }
        for baseline in ("random", "norm"):
            pairs = [(f"learned@{p:g}", f"{baseline}@{p:g}", "two-sided") for p in sorted(cfg.fractions)
                     if not (metric == "feature_cosine_dropped" and p == 1.0)]  # fmt: skip
            for result in stats.compare_family(series, pairs, cfg.n_boot, cfg.seed):
                rows.append({"metric": metric, "baseline": baseline, "fraction": float(result.a.split("@")[1]),
                             **result.to_dict()})  # fmt: skip
    return pd.DataFrame(rows)
