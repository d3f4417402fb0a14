"""SAE stage: sparse autoencoders on one encoder's patch tokens (reconlab's own mode; arXiv:2504.11695 trains on
pooled embeddings), judged on held-out images and looked at through the encoder's reconstructor R.

Trains, on the train store, the primary SAE (first variant at the middle of its sparsity sweep) with every seed
and each (variant, sparsity) of the sweep with the first seed; then on held-out tokens: fidelity (R² over the whole
set, float64), mean L0, dead and dense latents, a PCA baseline at the same numbers of components (the Pareto
table), stability of the primary setting across seeds (Hungarian matching of unit decoder rows, overall and by
concept energy), the SAE's pixel cost (R(SAE(f)) vs R(f) and vs the image), concept edits (one latent scaled on
every token where it fires, the SAE's residual added back, reconstructed by R) and top-activating-image sheets.

Two artifacts, as the token stage: the trained SAEs (keyed by the train store and the training fields; one
resumable folder each) and the evaluation (keyed by those, the held-out store and R).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import artifacts
from pipeline.artifacts import WriteLock
from pipeline.config import config_hash
from pipeline.data import caption_store
from pipeline.data.store_info import StoreInfo, open_encoded
from pipeline.jobs import SaeJob
from pipeline.models import checkpoints, sae_analysis, sae_training
from pipeline.models.encoders import resolve_compute_dtype, resolve_device
from pipeline.report import sae_report
from pipeline.science import metrics, stats
from pipeline.science import sae as science
from storage import FeatureStore

MODELS_MARKER = "saes.json"  # the trained SAEs' key and input screen, written when their folder is made
_EVAL_FIELDS = ("split", "n_eval_images", "n_edit_latents", "edit_scale", "dense_frequency")


@dataclass(frozen=True)
class SaeResult:
    out_dir: Path
    models_dir: Path
    report: Path
    already_complete: bool


def models_key(job: SaeJob, train: FeatureStore, device: torch.device) -> dict:
    fields = {k: v for k, v in artifacts.identity(job.cfg).items() if k not in _EVAL_FIELDS}
    for swept in ("variants", "k", "l0_coefficients", "l1_coefficients", "seeds", "text_shares"):
        fields.pop(swept)  # each SAE has its own folder: widening a sweep re-uses the SAEs already trained
    return {"sae": fields, "device": device.type,
            "compute_dtype": str(resolve_compute_dtype(job.cfg.compute_dtype, device)).removeprefix("torch."),
            "train_store": StoreInfo.of(train).digest,
            **({"train_captions": caption_store.digest(job.text_train)} if job.text_train else {})}  # fmt: skip


def keys_and_dirs(job: SaeJob, train: FeatureStore, held_out: FeatureStore, header: dict):
    name = StoreInfo.of(train).encoder_name
    key = models_key(job, train, resolve_device(job.cfg.device))
    models_dir = artifacts.folder(Path(job.cfg.output_root) / "models", name, key)
    eval_key = {"saes": config_hash(key), "sae": artifacts.identity(job.cfg),
                "held_out_store": StoreInfo.of(held_out).digest}  # fmt: skip
    if job.cfg.inputs == "tokens":  # only patch-token SAEs are looked at through R
        eval_key |= {"reconstructor": header["config_hash"],
                     "reconstructor_weights_sha256": checkpoints.weights_sha256(header)}  # fmt: skip
    else:
        eval_key["held_out_captions"] = caption_store.digest(job.text_eval)
    return key, models_dir, eval_key, artifacts.folder(job.cfg.output_root, name, eval_key)


def run(job: SaeJob, *, progress: bool = False) -> SaeResult:
    """Train (or resume) the SAEs, then evaluate and report; returns at once when finished before."""
    run_of_r = checkpoints.training_run_of(job.checkpoint)
    with artifacts.reading(job.train_store, job.eval_store, run_of_r, job.text_train, job.text_eval):
        return _run(job, progress)


def _run(job: SaeJob, progress: bool) -> SaeResult:
    train, held_out = open_encoded(job.train_store), open_encoded(job.eval_store)
    header = checkpoints.read_header(job.checkpoint)
    key, models_dir, eval_key, out_dir = keys_and_dirs(job, train, held_out, header)
    if artifacts.finished(out_dir / artifacts.RESULT) is not None:
        return SaeResult(out_dir, models_dir, out_dir / "report.md", already_complete=True)
    rows = checkpoints.study_rows(
        train, held_out, header, job.cfg.n_eval_images, f"sae.split '{job.cfg.split}'"
    )
    saes, screening = train_all(job, train, key, models_dir, progress)
    with WriteLock(out_dir):
        if artifacts.finished(out_dir / artifacts.RESULT) is None:
            out_dir.mkdir(parents=True, exist_ok=True)
            analysis = (evaluate(job, train, held_out, rows, saes) if job.cfg.inputs == "tokens"
                        else sae_analysis.evaluate_embeddings(job.cfg, train, held_out, rows, saes, job.text_train, job.text_eval))  # fmt: skip
            inputs = [
                {"input": "train store", "path": str(job.train_store), "sha256": StoreInfo.of(train).content_sha256},
                {"input": "held-out store", "path": str(job.eval_store),
                 "sha256": StoreInfo.of(held_out).content_sha256},
                {"input": "reconstructor R", "path": str(job.checkpoint),
                 "sha256": checkpoints.weights_sha256(header)},
                {"input": "trained SAEs", "path": str(models_dir), "sha256": config_hash(key)},
            ] + [{"input": f"captions ({role})", "path": str(p), "sha256": caption_store.digest(p)["config_hash"]}
                 for role, p in (("train", job.text_train), ("held out", job.text_eval)) if p]  # fmt: skip
            sae_report.write(out_dir, analysis, screening, job.cfg, _training_table(saes), inputs, eval_key)
            artifacts.finish(out_dir / artifacts.RESULT, eval_key,
                             {"saes": str(models_dir), "report": str(out_dir / "report.md")})  # fmt: skip
    return SaeResult(out_dir, models_dir, out_dir / "report.md", already_complete=False)


def train_all(job: SaeJob, train: FeatureStore, key: dict, models_dir: Path, progress: bool):
    """Every SAE the config asks for, trained or found ({SaeSpec: final checkpoint}), and the input screen."""
    cfg = job.cfg
    device = resolve_device(cfg.device)
    specs = sae_training.sae_specs(cfg)
    sae_training.check_dictionary(cfg, source_for(job, train, specs[0]).dim, f"{train.path.name}'s vectors")
    found = {s: models_dir / s.name / "final.json" for s in specs}
    marker = models_dir / MODELS_MARKER
    if marker.is_file() and all(p.is_file() for p in found.values()):
        return found, json.loads(marker.read_text())["screen"]
    with WriteLock(models_dir):
        models_dir.mkdir(parents=True, exist_ok=True)
        screening = sae_training.screen(source_for(job, train, sae_training.primary(cfg)).screen_chunks())
        saved = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in screening.items()}
        artifacts.write_json_atomic(marker, {"key": key, "screen": saved})
        base = {"config": key, "config_hash": config_hash(key), "train_store": str(train.path),
                "encoder": StoreInfo.of(train).encoder_identity}  # fmt: skip
        dtype = resolve_compute_dtype(cfg.compute_dtype, device)
        for spec in specs:
            sae_training.train_sae(source_for(job, train, spec), spec, cfg, models_dir / spec.name, screening["mean"],
                                   base, device, dtype, progress)  # fmt: skip
        artifacts.finish(models_dir / artifacts.RESULT, key, {"saes": [s.name for s in specs]})
    return found, saved


def source_for(
    job: SaeJob, train: FeatureStore, spec
) -> sae_training.TokenSource | sae_training.EmbeddingSource:
    if job.cfg.inputs == "tokens":
        return sae_training.TokenSource(train, job.cfg)
    return sae_training.EmbeddingSource(train, job.text_train, job.cfg, spec.text_share)


def _training_table(saes: dict) -> pd.DataFrame:
    rows = []
    for spec, path in saes.items():
        m = json.loads(Path(path).read_text())["metrics"]
        rows.append({"sae": spec.name, "epochs": m["epoch"] + 1, "steps": m["step"], "loss": m["loss"],
                     "training L0": m["l0"], "dead at the end (AuxK window)": m["dead_latents"]})  # fmt: skip
    return pd.DataFrame(rows)


@torch.no_grad()
def evaluate(job: SaeJob, train: FeatureStore, held_out: FeatureStore, rows: np.ndarray, saes: dict) -> dict:
    cfg = job.cfg
    device = resolve_device(cfg.device)
    models = {spec: sae_training.load(path, device)[0] for spec, path in saes.items()}
    main = sae_training.primary(cfg)
    fidelity = {spec: science.Fidelity() for spec in models}
    max_per_image = []  # primary SAE: each image's largest activation of each latent
    energy_sum = torch.zeros(models[main].n_latents, dtype=torch.float64)
    for start in range(0, len(rows), 16):
        x = sae_training.tokens_of(torch.from_numpy(held_out.features(rows[start : start + 16])).to(device))
        for spec, sae in models.items():
            x_n, _ = sae.normalise(x)
            codes = sae.activate(sae.pre_activations(x_n))
            fidelity[spec].update(x_n.cpu().numpy(), sae.decode(codes).cpu().numpy(), codes.cpu().numpy())
            if spec == main:
                energy_sum += codes.double().sum(dim=0).cpu()
                n_img = len(rows[start : start + 16])
                max_per_image.append(codes.view(n_img, -1, codes.shape[-1]).amax(dim=1).cpu().numpy())
    table = sae_analysis.pareto_rows(models, fidelity, cfg.dense_frequency)

    def chunks(store, rows):
        return (store.features(rows[i : i + 64]) for i in range(0, len(rows), 64))

    train_rows = np.flatnonzero(train.valid())[:1024]
    table += sae_analysis.pca_rows(models[main], chunks(train, train_rows), lambda: chunks(held_out, rows),
                                   sorted({max(1, round(r["l0"])) for r in table}))  # fmt: skip
    energy = (energy_sum / fidelity[main].n).numpy()
    return {"pareto": pd.DataFrame(table), "stability": sae_analysis.stability(models, main, energy), "energy": energy,
            "firing": fidelity[main].firing_frequency(), "primary": main.name,
            "pixels": pixel_cost(job, held_out, rows, models[main]),
            "edits": concept_edits(job, held_out, rows, models[main], energy, fidelity[main].firing_frequency(),
                                   np.concatenate(max_per_image))}  # fmt: skip


def _reconstructor(job: SaeJob, store: FeatureStore, device):
    model, _ = checkpoints.load_reconstructor(job.checkpoint, device=device)
    pre = StoreInfo.of(store).preprocessing
    (h, w), dim = store.layout.grid_hw, store.layout.hidden_dim
    return lambda tokens, b: checkpoints.reconstruct(model, tokens.reshape(b, h, w, dim), pre)


def pixel_cost(job: SaeJob, store: FeatureStore, rows: np.ndarray, sae) -> pd.DataFrame:
    """Per image: PSNR and SSIM of R(f) and R(SAE(f)) against the image, and of R(SAE(f)) against R(f)."""
    device = resolve_device(job.cfg.device)
    reconstruct = _reconstructor(job, store, device)
    records = []
    for start in range(0, len(rows), 16):
        idx = rows[start : start + 16]
        images01 = store.pixels(idx).astype(np.float32) / 255
        x = sae_training.tokens_of(torch.from_numpy(store.features(idx)).to(device))
        full = reconstruct(x, len(idx)).astype(np.float32) / 255
        through = reconstruct(sae(x)[0], len(idx)).astype(np.float32) / 255
        for name, (ref, test) in {"R(f) vs image": (images01, full), "R(SAE(f)) vs image": (images01, through),
                                  "R(SAE(f)) vs R(f)": (full, through)}.items():  # fmt: skip
            records += [{"image_id": i, "comparison": name, "psnr_db": p, "ssim": s}
                        for i, p, s in zip(store.image_ids()[idx], metrics.psnr_db(ref, test),
                                           metrics.ssim(ref, test), strict=True)]  # fmt: skip
    per_image = pd.DataFrame(records)
    summary = []
    for name, group in per_image.groupby("comparison", sort=False):
        for metric in ("psnr_db", "ssim"):
            mean, low, high = stats.mean_ci(group[metric].to_numpy(), 2000, 0)
            summary.append({"comparison": name, "metric": metric, "n_images": len(group), "mean": mean,
                            "ci_low": low, "ci_high": high})  # fmt: skip
    return pd.DataFrame(summary)


def concept_edits(job: SaeJob, store: FeatureStore, rows: np.ndarray, sae, energy: np.ndarray, firing: np.ndarray,
                  max_per_image: np.ndarray) -> dict:  # fmt: skip
    """For the most energetic non-dense latents: the images where each fires most, and per image the original,
    R(f), R(edited) (the latent scaled by edit_scale where it fires, the SAE's residual f − SAE(f) added back so
    only that concept changes) and the latent's firing map; plus the sheets' latents with their top images."""
    cfg = job.cfg
    device = resolve_device(cfg.device)
    reconstruct = _reconstructor(job, store, device)
    (h, w) = store.layout.grid_hw
    candidates = [
        int(i) for i in np.argsort(energy)[::-1] if firing[i] <= cfg.dense_frequency and energy[i] > 0
    ]
    out = {"edits": {}, "sheets": {}}
    for latent in candidates[: max(cfg.n_edit_latents, cfg.n_sheet_latents)]:
        top = np.argsort(max_per_image[:, latent])[::-1][: cfg.n_grid_images]
        idx = np.sort(rows[top])
        x = sae_training.tokens_of(torch.from_numpy(store.features(idx)).to(device))
        x_n, scale = sae.normalise(x)
        codes = sae.activate(sae.pre_activations(x_n))
        firing_map = codes[:, latent].view(len(idx), h, w).cpu().numpy()
        entry = {"images": store.pixels(idx), "firing": firing_map, "energy": float(energy[latent]),
                 "frequency": float(firing[latent])}  # fmt: skip
        if latent in candidates[: cfg.n_edit_latents]:
            edited = codes.clone()
            edited[:, latent] *= cfg.edit_scale
            residual = x_n - sae.decode(codes)
            edited_raw = sae.denormalise(sae.decode(edited) + residual, scale)
            out["edits"][latent] = entry | {"full": reconstruct(x, len(idx)),
                                            "edited": reconstruct(edited_raw, len(idx))}  # fmt: skip
        if latent in candidates[: cfg.n_sheet_latents]:
            out["sheets"][latent] = entry
    return out
