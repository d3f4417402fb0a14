"""The token utility report: curves of every score against the keep fraction (means with 95% bootstrap CIs), the
paired tests, grids of kept-token masks and reconstructions, the training summary, the recorded choices (paper,
reconlab's choice or a departure) and the inputs with their hashes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import TokensConfig, config_hash
from pipeline.report.figures import operator_grid, pyplot
from pipeline.report.report import write_document
from pipeline.science import stats

METHODS = ("learned", "random", "norm")
COLOURS = {"learned": "tab:blue", "random": "tab:orange", "norm": "tab:green"}
LABELS = {
    "feature_cosine_dropped": "cosine of completed to original, dropped tokens",
    "feature_mse": "MSE of completed to original tokens (raw units)",
    "psnr_vs_full_db": "PSNR of R(selection) vs R(all tokens), dB",
    "psnr_db": "PSNR of R(selection) vs the image, dB",
    "ssim": "SSIM of R(selection) vs the image",
    "judge_cosine": "judge cosine of R(selection) vs the image (grayscale)",
}


def mean_table(scores: pd.DataFrame, cfg: TokensConfig) -> pd.DataFrame:
    rows = []
    for (metric, method, completion, p), group in scores.groupby(
        ["metric", "method", "completion", "fraction"]
    ):
        values = group["value"].dropna().to_numpy()
        if values.size:
            mean, low, high = stats.mean_ci(values, cfg.n_boot, cfg.seed)
            rows.append({"metric": metric, "method": method, "completion": completion, "fraction": p,
                         "n_images": values.size, "mean": mean, "ci_low": low, "ci_high": high})  # fmt: skip
    return pd.DataFrame(rows)


def figure_curves(means: pd.DataFrame, path: Path) -> None:
    plt = pyplot()
    metrics = [m for m in LABELS if m in set(means.metric)]
    cols = 3
    fig, axes = plt.subplots(-(-len(metrics) // cols), cols, figsize=(4.2 * cols, 3.2 * -(-len(metrics) // cols)),
                             squeeze=False)  # fmt: skip
    for ax, metric in zip(axes.flat, metrics, strict=False):
        of = means[means.metric == metric]
        for method in METHODS:
            for completion, style in (("completed", "-"), ("zeroed", ":")):
                line = of[(of.method == method) & (of.completion == completion)].sort_values("fraction")
                if len(line):
                    ax.plot(line.fraction, line["mean"], style, marker="o", ms=3, color=COLOURS[method],
                            label=f"{method}, {'completed' if completion == 'completed' else 'no completion'}")  # fmt: skip
                    ax.fill_between(
                        line.fraction, line.ci_low, line.ci_high, color=COLOURS[method], alpha=0.15
                    )
        ceiling = of[of.method == "all tokens"]
        if len(ceiling):
            ax.axhline(float(ceiling["mean"].iloc[0]), color="0.4", lw=1, ls="--", label="R(all tokens)")
        ax.set_title(LABELS[metric], fontsize=8)
        ax.set_xlabel("keep fraction p")
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    richest = max(
        axes.flat, key=lambda ax: len(ax.get_lines())
    )  # a pixel score: completed, no completion, R(all)
    fig.legend(*richest.get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=7)
    fig.subplots_adjust(bottom=0.18)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _overlay(images: np.ndarray, keep_bhw: np.ndarray) -> np.ndarray:
    """Images with dropped patches dimmed to a quarter."""
    scale = images.shape[1] // keep_bhw.shape[1]
    mask = np.repeat(np.repeat(keep_bhw, scale, axis=1), scale, axis=2)[..., None]
    return (images * (0.25 + 0.75 * mask)).astype(np.uint8)


def figure_grid(grid: dict, n_rows: int, path: Path) -> None:
    columns = {"image": grid["images"], "R(all tokens)": grid["full"]}
    for method in METHODS:
        keep, completed, zeroed = grid[method]
        columns[f"{method}: kept"] = _overlay(grid["images"], keep)
        columns[f"R({method}, completed)"] = completed
        if method == "learned":
            columns["R(learned, no completion)"] = zeroed
    operator_grid(columns, n_rows, path, f"held-out images at keep fraction {grid['fraction']:g}")


def choices_table(cfg: TokensConfig, feature_width: int) -> pd.DataFrame:
    paper, ours, departure = (
        "paper",
        "reconlab's choice (the paper does not state it)",
        "departure from the paper",
    )
    net = cfg.network
    rows = [
        ("selector", f"{net.depth} transformer layers + linear head, one keep logit per token",
         paper if net.depth == 3 else departure),
        ("completion network", f"{net.depth} transformer layers rebuilding every token", paper if net.depth == 3 else departure),
        ("width / heads", f"{net.width or feature_width} / {max(1, (net.width or feature_width) // net.head_dim)} "
         f"(width // {net.head_dim}, at least 1)", ("width set in the config; heads: " if net.width else
         "the encoder's width; heads: ") + ours),
        ("positions", "learned, added in both networks", ours + ": a shared mask token cannot be placed without them"),
        ("input standardisation", "per channel, mean/std of the train store, inside the model", ours),
        ("masked input", "M*F + (1-M)*E_mask, one shared learned E_mask", paper),
        ("training mask", f"Gumbel-Softmax over (keep, drop), hard straight-through, tau {cfg.gumbel_tau:g} constant",
         "paper (Gumbel-Softmax); hard/soft and tau: " + ours),
        ("reconstruction term", f"{cfg.loss} over {cfg.loss_tokens} tokens" + (", L2-normalised" if cfg.normalize_tokens else ", raw features"),
         paper + " (l2 over the whole token tensor; mean reduction is reconlab's reading)"
         if (cfg.loss, cfg.loss_tokens, cfg.normalize_tokens) == ("mse", "all", False) else departure),
        ("keep penalty", "max(L_pr, p), weight 1" if cfg.keep_penalty == "floor" else "|L_pr - p| (two-sided band)",
         paper if cfg.keep_penalty == "floor" else departure),
        ("selectors", "one per evaluated p" if cfg.selectors == "per_fraction" else f"one, trained at p = {cfg.shared_fraction:g}",
         paper if cfg.selectors == "per_fraction" else ours + " (option)"),
        ("inference", "exactly k = round(p * tokens) tokens with the highest selector logits", paper + " (top tokens)"),
        ("kept tokens", "pass through unchanged into the completed set (keep 1.0 returns the originals)", ours),
        ("random baseline", "random k tokens, completed by a network trained on random masks of its own kind (MAE-style)",
         "the paper's only baseline; its own completion: " + ours + " (a fair comparison)"),
        ("norm baseline", "the k tokens of largest L2 norm, completed by a network trained on such masks", ours),
        ("optimiser", f"Adam, lr {cfg.lr:g} constant, batch {cfg.batch_size}, {cfg.epochs} epochs, seed {cfg.seed}", ours),
        ("judge", ("grayscale copies resized to " + f"{cfg.judge_input_resolution} px (bilinear, truncated)"
                   if cfg.judge_input_resolution else "grayscale copies at the encoder's resolution")
         + ", as the evaluate stage", "reconstruction paper's released code" if cfg.judge_input_resolution == 224
         else ours + " (judge_input_resolution)"),
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=["setting", "value", "source"])


def write(out_dir: Path, scores: pd.DataFrame, tests: pd.DataFrame, grid: dict, cfg: TokensConfig,
          training: pd.DataFrame, inputs: list[dict], key: dict, judge: str | None,
          feature_width: int) -> tuple[Path, Path]:  # fmt: skip
    means = mean_table(scores, cfg)
    means.to_csv(out_dir / "means.csv", index=False)
    figure_curves(means, out_dir / "curves.png")
    figure_grid(grid, cfg.n_grid_images, out_dir / "grid.png")
    completed = means[means.completion.isin(["completed", "none"])]
    pivot = completed.pivot_table(index=["fraction", "method"], columns="metric", values="mean").reset_index()
    zeroed = means[means.completion == "zeroed"]
    zeroed = zeroed.pivot_table(index=["fraction", "method"], columns="metric", values="mean").reset_index()
    cols = ["metric", "baseline", "fraction", "n_pairs", "mean_a", "mean_b", "mean_diff", "diff_ci_low",
            "diff_ci_high", "wilcoxon_p", "holm_p_wilcoxon", "permutation_p", "holm_p_permutation", "rank_biserial"]  # fmt: skip
    sections = [
        ("What this measures", "Which patch tokens can be dropped because the others carry them (arXiv:2503.16660), "
         "seen in feature space and, through the encoder's trained reconstructor R, in pixels. The paper's headline "
         "(about half of the tokens can go on OCR-like VLM tasks; random 30% retention suffices on general ones) is "
         "about VLM answers: these feature and pixel measures are a different lens, and this report does not claim to "
         "reproduce it. 'completed': dropped tokens rebuilt by the method's own completion network; 'no completion': "
         "R applied to the kept tokens with dropped positions zeroed."),
        ("Recorded choices", choices_table(cfg, feature_width)),
        ("Mean scores (completed sets; 'all tokens' is R(f(x)), the ceiling)", pivot),
        ("figure:curves.png", None),
        ("Mean scores with no completion (R of the kept tokens, dropped positions zeroed; dotted in the figure)",
         zeroed),
        ("Learned vs baselines: two-sided paired tests per fraction (Holm across fractions, per metric and baseline)",
         tests[cols] if len(tests) else tests),
        ("figure:grid.png", None),
        ("Training (last epoch; kept fraction of the training masks)", training),
        ("Inputs (every number above traces to these)", pd.DataFrame(inputs)),
        ("Run", pd.DataFrame([{"key hash": config_hash(key), "held-out images": int(scores.image_id.nunique()),
                               "judge": judge or "none"}])),
    ]  # fmt: skip
    return write_document(out_dir, "reconlab token utility report", sections)
