"""The SAE report: the Pareto table and figure (R² vs L0 per variant, PCA beside them), stability of the primary
setting across seeds (overall and by concept energy), dead and dense latents, the input screen, the SAE's cost in
pixels, concept-edit grids and top-activating-image sheets, the recorded choices and the inputs with hashes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import SaeConfig, config_hash
from pipeline.report.figures import pyplot
from pipeline.report.report import write_document

OURS = "reconlab's choice (the papers do not state it)"


def figure_pareto(pareto: pd.DataFrame, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for variant, group in pareto.groupby("variant", sort=False):
        group = group.sort_values("l0")
        style = "k--" if variant == "pca" else "-o"
        ax.plot(group.l0, group.r2, style, ms=4, label=variant)
    ax.set_xscale("log")
    ax.set_xlabel("mean L0 (active latents per token; PCA: components)")
    ax.set_ylabel("R² on held-out tokens")
    ax.legend(fontsize=7)
    ax.set_title("fidelity vs sparsity", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def figure_energy(energy: np.ndarray, firing: np.ndarray, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    axes[0].hist(np.log10(firing[firing > 0]), bins=40)
    axes[0].set_xlabel("log10 firing frequency (latents that fired)")
    axes[1].hist(np.log10(energy[energy > 0]), bins=40)
    axes[1].set_xlabel("log10 energy (mean activation)")
    fig.suptitle(f"primary SAE: {int((firing == 0).sum())} of {firing.size} latents never fired on held-out tokens",
                 fontsize=8)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _overlay(images: np.ndarray, firing_bhw: np.ndarray) -> np.ndarray:
    """Images dimmed where the latent is silent, brighter where it fires harder."""
    peak = firing_bhw.max(axis=(1, 2), keepdims=True)
    level = np.where(peak > 0, firing_bhw / np.where(peak > 0, peak, 1), 0)
    scale = images.shape[1] // firing_bhw.shape[1]
    level = np.repeat(np.repeat(level, scale, axis=1), scale, axis=2)[..., None]
    return (images * (0.2 + 0.8 * level)).astype(np.uint8)


def figure_modality(modality: np.ndarray, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(modality[np.isfinite(modality)], bins=20, range=(0, 1))
    ax.set_xlabel("modality score: image energy / (image + text energy)")
    ax.set_ylabel("concepts")
    ax.set_title("0: text-only, 1: image-only (concepts that fired)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def figure_bridges(bridges: list[dict], images: list[np.ndarray], path: Path) -> None:
    plt = pyplot()
    n_cols = max(len(i) for i in images)
    fig, axes = plt.subplots(
        len(images), n_cols, figsize=(1.8 * n_cols + 4, 1.8 * len(images)), squeeze=False
    )
    for row, (bridge, tiles) in enumerate(zip(bridges, images, strict=True)):
        for j in range(n_cols):
            axes[row, j].axis("off")
            if j < len(tiles):
                axes[row, j].imshow(tiles[j])
        caption = bridge["captions where b fires most"].split(" | ")[0]
        axes[row, -1].text(1.05, 0.5, f"{bridge['image concept']} → {bridge['text concept']}: {caption[:60]}",
                           transform=axes[row, -1].transAxes, fontsize=7, va="center")  # fmt: skip
    fig.suptitle("top bridges: images where the image concept fires most, and a caption firing the text concept",
                 fontsize=8)  # fmt: skip
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def figure_edit(latent: int, entry: dict, cfg: SaeConfig, path: Path) -> None:
    plt = pyplot()
    diff = np.abs(entry["full"].astype(np.float32) - entry["edited"].astype(np.float32)).mean(axis=-1)
    columns = {"image": entry["images"], "R(f)": entry["full"], f"R(edited, x{cfg.edit_scale:g})": entry["edited"],
               "|R(f) − R(edited)|": diff, "where it fires": _overlay(entry["images"], entry["firing"])}  # fmt: skip
    n = len(entry["images"])
    fig, axes = plt.subplots(n, len(columns), figsize=(1.8 * len(columns), 1.8 * n), squeeze=False)
    for j, (name, images) in enumerate(columns.items()):
        for i in range(n):
            axes[i, j].imshow(images[i], cmap="magma" if images.ndim == 3 else None)
            axes[i, j].axis("off")
        axes[0, j].set_title(name, fontsize=7)
    fig.suptitle(f"latent {latent}: energy {entry['energy']:.3g}, fires on {entry['frequency']:.1%} of tokens",
                 fontsize=8)  # fmt: skip
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def figure_sheets(sheets: dict, path: Path) -> None:
    plt = pyplot()
    n_cols = max(len(e["images"]) for e in sheets.values())
    fig, axes = plt.subplots(len(sheets), n_cols, figsize=(1.5 * n_cols, 1.6 * len(sheets)), squeeze=False)
    for i, (latent, entry) in enumerate(sheets.items()):
        tiles = _overlay(entry["images"], entry["firing"])
        for j in range(n_cols):
            axes[i, j].axis("off")
            if j < len(tiles):
                axes[i, j].imshow(tiles[j])
        axes[i, 0].set_title(f"latent {latent} ({entry['frequency']:.1%} of tokens)", fontsize=7, loc="left")
    fig.suptitle("top-activating held-out images per latent (bright: where it fires)", fontsize=8)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def choices_table(cfg: SaeConfig) -> pd.DataFrame:
    rows = [
        ("inputs", "patch tokens of one store (one vector per token)", "reconlab's own mode (2504.11695 trains on pooled "
         "image and caption embeddings)") if cfg.inputs == "tokens" else
        ("inputs", f"pooled image embeddings and caption embeddings of one model, captions {cfg.text_shares} of each "
         f"batch ({cfg.batch_vectors} vectors)", "2504.11695 (the mix: a setting it varies; the values: " + OURS + ")"),
        ("normalisation", ("unit L2 per vector" if cfg.unit_norm_inputs else "none") + (", centred on the training mean"
         if cfg.center else ""), "the papers' normalised embeddings" if cfg.unit_norm_inputs and not cfg.center else OURS),
        ("variants", ", ".join(cfg.variants), "BatchTopK first (best trade-off in 2504.11695); the others: " + OURS
         if cfg.variants[0] == "batchtopk" else OURS + " (2504.11695 found BatchTopK the best trade-off)"),
        ("dictionary", f"{cfg.expansion} x feature width, decoder rows at unit norm", OURS + " for the size"),
        ("decoder bias", "x̂ = W_dec z + b, b subtracted before encoding (arXiv:2406.04093)" if cfg.uses_decoder_bias()
         else "none: x̂ = D z", "as 2504.11695 (x̂ = D z)" if not cfg.uses_decoder_bias() else OURS + " (2504.11695 "
         "has none; a shared bias takes up the mean vector, so codes and Bridge Scores are not the paper's quantities)"),
        ("sparsity sweep", "; ".join(f"{name} {values}" for kinds, name, values in (
            ({"topk", "batchtopk"}, "k", cfg.k), ({"jumprelu"}, "JumpReLU L0", cfg.l0_coefficients),
            ({"relu"}, "ReLU L1", cfg.l1_coefficients)) if kinds & set(cfg.variants)), OURS),
        *([("BatchTopK inference", "one global threshold: EMA (0.99) of the smallest surviving training activation",
            OURS)] if "batchtopk" in cfg.variants else []),
        *([("JumpReLU", f"learned threshold per latent (initial {cfg.jumprelu_threshold:g}), rectangle-kernel "
            f"straight-through of width {cfg.jumprelu_bandwidth:g}: sized for unit-norm inputs, whose pre-activations "
            "are cosines (the JumpReLU paper's 1e-3 assumes inputs of norm ~sqrt(width))", OURS + " (values)")]
          if "jumprelu" in cfg.variants else []),
        ("dead latents", f"AuxK (weight {cfg.aux_coefficient:g}, k_aux = width / 2) after {cfg.dead_window} silent "
         "training vectors, for the top-k variants; no resampling" if {"topk", "batchtopk"} & set(cfg.variants)
         else "no auxiliary loss (AuxK is for the top-k variants) and no resampling", OURS),
        ("optimiser", f"Adam, lr {cfg.lr:g} constant, {cfg.epochs} epochs, {cfg.batch_images} images per step", OURS),
        ("R²", "1 − Σ‖x − x̂‖² / Σ‖x − μ‖² over all held-out tokens, one global μ, float64, in the SAE's input space",
         OURS + " (the usual fraction of variance explained, taken over the whole held-out set)"),
        ("dead / dense on held-out", f"never fired on the held-out tokens / fired on more than {cfg.dense_frequency:.0%}",
         OURS + " (thresholds)"),
        ("linear baseline", "PCA fitted on training tokens, k = each SAE's rounded L0", OURS),
        ("stability", f"primary setting, seeds {cfg.seeds}: Hungarian matching of unit decoder rows (scipy)"
         if len(cfg.seeds) > 1 or len(cfg.text_shares) > 1 and cfg.inputs == "embeddings"
         else "not measured: the primary setting trains once (one seed)",
         "2504.11695"),
        ("concept edits", f"latent x {cfg.edit_scale:g} where it fires, SAE residual added back, R reconstructs", OURS),
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=["setting", "value", "source"])


def write(out_dir: Path, analysis: dict, screening: dict, cfg: SaeConfig, training: pd.DataFrame, inputs: list[dict],
          key: dict) -> tuple[Path, Path]:  # fmt: skip
    if "bridges" in analysis:
        return _write_embeddings(out_dir, analysis, screening, cfg, training, inputs, key)
    pareto = analysis["pareto"]
    pareto.to_csv(out_dir / "pareto.csv", index=False)
    analysis["pixels"].to_csv(out_dir / "pixel_cost.csv", index=False)
    figure_pareto(pareto, out_dir / "pareto.png")
    figure_energy(analysis["energy"], analysis["firing"], out_dir / "energy.png")
    sections = [
        ("What this is", "Sparse autoencoders on one encoder's patch tokens (reconlab's own mode: arXiv:2504.11695 "
         "trains on pooled image and caption embeddings; embedding SAEs and the Bridge Score are not part of this "
         "run). Every metric is on held-out images. Frequent concepts are expected to be stable across seeds and "
         "rare ones not (2504.11695), so a low overall matched cosine is not by itself a fault."),
        ("Recorded choices", choices_table(cfg)),
        ("Input screen (training tokens)", _screen_table(screening, cfg)),
        ("Pareto table: fidelity vs sparsity on held-out tokens", pareto),
        ("figure:pareto.png", None),
        *_stability(out_dir, analysis, cfg, "across seeds", "energy of the first seed's latents on held-out tokens"),
        ("figure:energy.png", None),
        ("The SAE's cost in pixels (primary SAE; means with 95% bootstrap CIs)", analysis["pixels"]),
    ]  # fmt: skip
    for latent, entry in analysis["edits"]["edits"].items():
        figure_edit(latent, entry, cfg, out_dir / f"edit-{latent}.png")
        sections += [(f"Concept edit: latent {latent}", None), (f"figure:edit-{latent}.png", None)]
    if analysis["edits"]["sheets"]:
        figure_sheets(analysis["edits"]["sheets"], out_dir / "sheets.png")
        sections += [("Top-activating images", None), ("figure:sheets.png", None)]
    sections += [
        ("Training (last epoch)", training),
        ("Inputs (every number above traces to these)", pd.DataFrame(inputs)),
        ("Run", pd.DataFrame([{"key hash": config_hash(key)}])),
    ]
    return write_document(out_dir, "reconlab SAE report", sections)


def _stability(out_dir: Path, analysis: dict, cfg: SaeConfig, across: str, energy: str) -> list[tuple]:
    """The stability sections, their numbers in stability.csv and stability_by_energy.csv (or why there are none)."""
    pairs, by_energy = analysis["stability"]["pairs"], analysis["stability"]["by_energy"]
    pairs.to_csv(out_dir / "stability.csv", index=False)
    by_energy.to_csv(out_dir / "stability_by_energy.csv", index=False)
    title = f"Stability of the primary setting ({analysis['primary']}) {across}"
    if pairs.empty:
        return [
            (title, f"Not measured: the primary setting trained once (sae.seeds {cfg.seeds}); add a seed.")
        ]
    return [(title + " (stability.csv)", pairs), (f"Stability by concept energy ({energy}; stability_by_energy.csv)",
                                                  by_energy)]  # fmt: skip


def _screen_table(screening: dict, cfg: SaeConfig) -> pd.DataFrame:
    return pd.DataFrame([{
        "vectors screened": screening["n_vectors"], "median per-dimension std": screening["median_std"],
        "outlier dimensions (|mean| or std > 10x median std)": ", ".join(map(str, screening["outlier_dims"])) or "none",
        "their share of the energy": screening["outlier_share_of_energy"],
        "vector norm q01 / q50 / q99": " / ".join(f"{v:.3g}" for v in screening["norm_quantiles"].values()),
        "what was done": "unit L2 per vector" + (" after centring" if cfg.center else "") + "; dimensions kept as they are"}])  # fmt: skip


def _write_embeddings(out_dir: Path, analysis: dict, screening: dict, cfg: SaeConfig, training: pd.DataFrame,
                      inputs: list[dict], key: dict) -> tuple[Path, Path]:  # fmt: skip
    pareto = analysis["pareto"]
    pareto.to_csv(out_dir / "pareto.csv", index=False)
    bridges = pd.DataFrame(
        [{k: v for k, v in b.items() if not k.startswith("_")} for b in analysis["bridges"]]
    )
    bridges.to_csv(out_dir / "bridges.csv", index=False)
    analysis["per_modality"].to_csv(out_dir / "per_modality.csv", index=False)
    figure_pareto(pareto, out_dir / "pareto.png")
    figure_modality(analysis["modality"], out_dir / "modality.png")
    figure_energy(analysis["energy"], analysis["firing"], out_dir / "energy.png")
    sections = [
        ("What this is", "One sparse autoencoder on the image and caption embeddings of one vision-language model "
         f"(arXiv:2504.11695), caption vectors making up {cfg.text_shares[0]:g} of each training batch (the "
         "image:text mix, a setting the paper varies). Every metric is on held-out images and their captions. "
         "The paper's findings, reported here and not forced: most concepts are strongly unimodal (modality score "
         "near 0 or 1), frequent concepts are stable across runs and rare ones are not, and bridges join different "
         "unimodal concepts."),
        ("Recorded choices", choices_table(cfg)),
        ("Input screen (training vectors: image and caption embeddings)", _screen_table(screening, cfg)),
        ("Pareto table: fidelity vs sparsity on held-out images and captions", pareto),
        ("figure:pareto.png", None),
        ("Fidelity per modality", analysis["per_modality"]),
        *_stability(out_dir, analysis, cfg, "across seeds and mixes", "energy of the first run's latents"),
        ("figure:energy.png", None),
        ("Modality scores", f"{analysis['unimodal_share']:.1%} of the concepts that fired have a modality score below 0.1 "
         "or above 0.9 (strongly unimodal)."),
        ("figure:modality.png", None),
        ("Top bridges: B = E_pairs[z_img z_txtᵀ] ⊙ (D Dᵀ) over held-out image–caption pairs, diagonal left out "
         "(reconlab's choice: a bridge joins two different concepts)", bridges),
    ]  # fmt: skip
    if analysis["bridge_images"]:
        figure_bridges(analysis["bridges"], analysis["bridge_images"], out_dir / "bridges.png")
        sections.append(("figure:bridges.png", None))
    sections += [
        ("Training (last epoch)", training),
        ("Inputs (every number above traces to these)", pd.DataFrame(inputs)),
        ("Run", pd.DataFrame([{"key hash": config_hash(key)}])),
    ]
    return write_document(out_dir, "reconlab SAE report (image and caption embeddings)", sections)
