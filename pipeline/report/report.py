"""The evaluation report: report.md and a self-contained report.html (figures embedded), with every input listed."""

from __future__ import annotations

import base64
import datetime as dt
import html
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import ReconstructorConfig
from pipeline.data.store_info import StoreInfo
from pipeline.models.checkpoints import load_reconstructor, read_header, reconstruct
from pipeline.report.figures import pyplot
from storage import open_store


def _label(key: tuple[str, str]) -> str:
    return f"{key[0]} / {key[1]}"


def figure_distributions(scores: pd.DataFrame, key, names, path: Path) -> None:
    plt = pyplot()
    subset = scores[(scores.judge == key[0]) & (scores.metric == key[1])]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(names), 3.2))
    ax.violinplot([subset[subset.encoder == n]["value"].to_numpy() for n in names], showmedians=True)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(_label(key), fontsize=8)
    ax.set_title("per-image scores", fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def figure_ranking(ranking: pd.DataFrame, key, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 0.5 + 0.35 * len(ranking)))
    y = np.arange(len(ranking))[::-1]
    err = [ranking["mean"] - ranking["ci_low"], ranking["ci_high"] - ranking["mean"]]
    ax.errorbar(ranking["mean"], y, xerr=err, fmt="o", capsize=3)
    ax.set_yticks(y, ranking["encoder"], fontsize=8)
    ax.set_xlabel(f"mean {_label(key)} (95% bootstrap CI)", fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def figure_differences(scores: pd.DataFrame, key, comparisons, path: Path) -> None:
    plt = pyplot()
    subset = scores[(scores.judge == key[0]) & (scores.metric == key[1])]
    n = max(1, len(comparisons))
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.6), squeeze=False)
    for ax, c in zip(axes[0], comparisons, strict=False):
        a = subset[subset.encoder == c.a].set_index("image_id")["value"]
        b = subset[subset.encoder == c.b].set_index("image_id")["value"]
        common = a.index.intersection(b.index)
        ax.hist((a.loc[common] - b.loc[common]).to_numpy(), bins=20, color="0.6")
        ax.axvline(0, color="k", lw=0.8)
        ax.axvline(c.mean_diff, color="C3", lw=1.2)
        ax.axvspan(c.diff_ci_low, c.diff_ci_high, color="C3", alpha=0.2)
        ax.set_title(
            f"{c.a} − {c.b} ({c.alternative})\nWilcoxon p={c.wilcoxon_p:.2g}, perm p={c.permutation_p:.2g}, "
            f"boot p={c.bootstrap_p:.2g}",
            fontsize=7,
        )
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def figure_depth(means: pd.DataFrame, keys: list, path: Path) -> None:
    """Informativeness vs depth: one panel per score, one line per network, 95% bootstrap CIs."""
    plt = pyplot()
    fig, axes = plt.subplots(
        1, len(keys), figsize=(3.8 * len(keys), 2.8), squeeze=False, layout="constrained"
    )
    for ax, (judge, metric) in zip(axes[0], keys, strict=True):
        for network, rows in means[(means.judge == judge) & (means.metric == metric)].groupby("network"):
            rows = rows.sort_values("depth")
            err = [rows["mean"] - rows["ci_low"], rows["ci_high"] - rows["mean"]]
            ax.errorbar(rows["depth"], rows["mean"], yerr=err, fmt="o-", capsize=3, label=network)
        ax.set_xlabel("depth (block or stage; last+1 = final output)", fontsize=7)
        ax.set_ylabel(f"mean {_label((judge, metric))}", fontsize=7)
        ax.legend(fontsize=6)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def figure_grid(targets, image_ids: np.ndarray, path: Path) -> None:
    """Row 0: originals; one row of reconstructions per encoder, same images."""
    plt = pyplot()
    rows = []
    for t in targets:
        store = open_store(t.store)
        model, _ = load_reconstructor(t.checkpoint)
        index = {int(i): r for r, i in enumerate(store.image_ids())}
        sel = np.array([index[int(i)] for i in image_ids])
        if not rows:
            rows.append(("original", store.pixels(sel)))
        rows.append(
            (t.encoder_name, reconstruct(model, store.features(sel), StoreInfo.of(store).preprocessing))
        )
    fig, axes = plt.subplots(
        len(rows), len(image_ids), figsize=(1.6 * len(image_ids), 1.7 * len(rows)), squeeze=False
    )
    for i, (name, images) in enumerate(rows):
        for j, im in enumerate(images):
            axes[i, j].imshow(im)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
        axes[i, 0].set_ylabel(name, fontsize=7)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def _values(records: list, *keys: str) -> str:
    """The distinct values of a nested field over the runs' stores or checkpoints, joined."""
    out = []
    for record in records:
        for k in keys:
            record = record.get(k, "?") if isinstance(record, dict) else "?"
        out.append(str(record))
    return ", ".join(dict.fromkeys(out))


def _is_released(model: dict) -> bool:
    defaults = ReconstructorConfig().model_dump(mode="json")
    return all(model.get(k) == v for k, v in defaults.items() if k not in ("min_channels", "resize_mode"))


def setup_table(targets, cfg) -> pd.DataFrame:
    """What this run did beside what the paper's text and its released code do, with the source of each choice.

    Values come from the stores and checkpoints themselves, not from the config that asked for them."""
    infos = [StoreInfo.of(open_store(t.store)) for t in targets]
    encoders, store_keys = [i.encoder for i in infos], [i.key for i in infos]
    headers = [read_header(t.checkpoint) for t in targets]
    train = [h["config"]["train"] for h in headers]
    model = [h["model"] for h in headers]
    rows = [
        ("feature layer", _values(encoders, "feature_layer"), "'last layer' (text)", "hidden_states[-2]",
         "released code (default -2); 'last' is an option"),
        ("image geometry", _values(encoders, "preprocessing", "geometry"), "not stated",
         "encode: SigLIP processor (squash); judge: short side + centre crop",
         "reconlab: short_side_crop gives every encoder the same field of view; native is an option"),
        ("per-token L2 normalisation", "yes", "yes", "yes (training loop)", "as published"),
        ("compute precision", "encode " + _values(store_keys, "compute_dtype") + ", train "
         + _values([h["config"] for h in headers], "compute_dtype") + ", judges float32", "not stated",
         "float32 throughout (features rounded to bf16 when saved)",
         "reconlab: bfloat16 autocast on CUDA for encode and train (compute_dtype: auto), float32 on CPU"),
        ("reconstructor", "upsample kernel " + _values(model, "upsample_kernel") + ", last-stage res blocks "
         + _values(model, "last_stage_res_blocks") + ", depth " + _values(model, "depth"),
         "4 transformer blocks + x2 conv upsampling", "CLIP layers (QuickGELU) + ConvTranspose2d(4, 2, 1), 3 res blocks",
         "released architecture" if all(_is_released(m) for m in model) else "DEPARTS from the released architecture"),
        ("loss", "MSE on the encoder-normalised image" + (" + L1" if any(t["l1_weight"] for t in train) else ""),
         "L2", "MSE", "as published"),
        ("optimiser", f"Adam lr {_values(train, 'lr')}, betas {_values(train, 'betas')}", "Adam 3e-4, (0.9, 0.999)",
         "Adam 3e-4", "as published" if all(t["lr"] == 3e-4 and list(t["betas"]) == [0.9, 0.999] for t in train)
         else "run setting"),
        ("LR schedule", f"linear warm-up from lr/25 over {_values(train, 'warmup_fraction')} of steps, cosine to lr/25e4",
         "cyclic, 5% warm-up", "CycleScheduler: linear 5% warm-up, cosine decay", "released code's shape"),
        ("batch size", _values(train, "batch_size"), "10 per device", "32", "run setting"),
        ("epochs", _values(train, "epochs"), "40", "40", "run setting"),
        ("checkpoint used", _values(train, "select_checkpoint"), "fixed 40-epoch schedule", "saved every epoch",
         "reconlab: 'last' selects nothing on held-out images"),
        ("judges", ", ".join(cfg.judge_names()) + " (" + ", ".join(cfg.judge_modes) + ")",
         "CLIP ViT-L/14, SigLIP2", "clip-vit-large-patch14, siglip2-large-patch16-256, both grayscale (PIL 'L')",
         "as released"),
        ("judge input", f"bilinear, no antialiasing, to {cfg.judge_input_resolution} px, truncated to uint8"
         if cfg.judge_input_resolution else "the stored image at the encoder's resolution", "not stated",
         "F.interpolate bilinear to 224 px, truncated to uint8, then the judge's processor",
         "as released" if cfg.judge_input_resolution == 224 else "run setting (judge_input_resolution)"),
        ("tests", "Wilcoxon signed-rank, paired bootstrap (BCa CI, re-centred p), sign-flip permutation",
         "Wilcoxon, bootstrap", "-", "permutation test added by reconlab (exact at small n)"),
        ("alternative", cfg.alternative + " unless a comparison states its own", "not stated", "-", "reconlab's choice"),
        ("multiple comparisons", f"Holm per score family, alpha {cfg.alpha}", "not stated", "-", "reconlab's choice"),
        ("pixel metrics", f"MSE, PSNR, SSIM at {cfg.pixel_resolution} px", "-", "224 px", "reconlab"),
    ]  # fmt: skip
    return pd.DataFrame(
        rows, columns=["setting", "this run", "paper (text)", "released code", "source / status"]
    )


def _comparison_table(family) -> pd.DataFrame:
    cols = ["a", "b", "alternative", "n_pairs", "n_only_a", "n_only_b", "mean_a", "mean_b", "mean_diff",
            "diff_ci_low", "diff_ci_high", "wilcoxon_p", "permutation_p", "bootstrap_p", "holm_p_wilcoxon",
            "holm_p_permutation", "holm_p_bootstrap", "rank_biserial"]  # fmt: skip
    return pd.DataFrame([c.to_dict() for c in family])[cols] if family else pd.DataFrame(columns=cols)


def write(out_dir: Path, scores: pd.DataFrame, analysis: dict, targets, inputs: pd.DataFrame, notes: list[str],
          cfg, header: dict) -> tuple[Path, Path]:  # fmt: skip
    """Write figures, report.md and report.html under out_dir; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = analysis["names"]
    keys = list(analysis["rankings"])
    primary = analysis["primary"]
    figures = {
        "ranking.png": lambda p: figure_ranking(analysis["rankings"][primary], primary, p),
        "distributions.png": lambda p: figure_distributions(scores, primary, names, p),
        "differences.png": lambda p: figure_differences(scores, primary, analysis["comparisons"][primary], p),
    }
    common_ids = set.intersection(*(set(scores[scores.encoder == n]["image_id"]) for n in names))
    grid_ids = np.array(sorted(common_ids)[: cfg.n_grid_images])
    figures["reconstructions.png"] = lambda p: figure_grid(targets, grid_ids, p)
    layer_means, layer_tests = analysis["layer_means"], analysis["layer_tests"]
    depth_keys = [primary, *(k for k in keys if k[0] == "pixels" and k[1] == "psnr_db" and k != primary)]
    if len(layer_means):
        figures["depth.png"] = lambda p: figure_depth(layer_means, depth_keys, p)
    for name, make in figures.items():
        make(out_dir / name)

    means = (
        scores.groupby(["encoder", "judge", "metric"])["value"].agg(["mean", "std", "count"]).reset_index()
    )
    sections: list[tuple[str, str | pd.DataFrame | None]] = [
        ("Run", pd.DataFrame([header])),
        ("Setup: this run beside the paper and its released code", setup_table(targets, cfg)),
        ("Inputs (every number below traces to these)", inputs),
        (f"Ranking by {_label(primary)}", analysis["rankings"][primary]),
        ("figure:ranking.png", None),
        ("Mean scores per encoder", means),
        ("figure:distributions.png", None),
    ]
    if analysis["headline"]:
        head = pd.DataFrame(analysis["headline"])[["judge", "metric", "a", "b", "alternative", "n_pairs", "mean_a",
                                                   "mean_b", "mean_diff", "wilcoxon_p", "permutation_p", "bootstrap_p",
                                                   "holm_p_wilcoxon"]]  # fmt: skip
        sections.append(("Headline: SigLIP vs SigLIP2 per resolution and judge", head))
    for key in keys:
        sections.append(
            (
                f"Paired comparisons: {_label(key)} (alternative about mean(a − b); Holm across this family)",
                _comparison_table(analysis["comparisons"][key]),
            )
        )
    if len(layer_means):
        cols = ["network", "judge", "metric", "a", "b", "depth_a", "depth_b", "n_pairs", "mean_a", "mean_b",
                "mean_diff", "diff_ci_low", "diff_ci_high", "wilcoxon_p", "holm_p_wilcoxon", "rank_biserial"]  # fmt: skip
        sections += [
            ("Informativeness vs depth (layers of one network; means with 95% bootstrap CIs)", layer_means),
            ("figure:depth.png", None),
            (
                "Adjacent layers: two-sided paired tests (Holm within each network and score)",
                layer_tests[cols],
            ),
        ]
    sections += [("figure:differences.png", None), ("Reconstructions of the same held-out images", None),
                 ("figure:reconstructions.png", None)]  # fmt: skip
    if notes:
        sections.append(("Notes", "\n".join(f"- {n}" for n in notes)))
    return write_document(out_dir, "reconlab evaluation report", sections)


def write_document(out_dir: Path, title: str, sections) -> tuple[Path, Path]:
    """report.md and report.html (figures embedded) from (title, table | text | None) sections; a section titled
    'figure:NAME' shows out_dir/NAME."""
    (out_dir / "report.md").write_text(_markdown(title, sections))
    (out_dir / "report.html").write_text(_html(title, sections, out_dir))
    return out_dir / "report.md", out_dir / "report.html"


def _markdown(title: str, sections) -> str:
    lines = [f"# {title}", ""]
    for title, body in sections:
        if title.startswith("figure:"):
            name = title.removeprefix("figure:")
            lines += [f"![{name}]({name})", ""]
            continue
        lines += [f"## {title}", ""]
        if isinstance(body, pd.DataFrame):
            lines += [body.to_markdown(index=False, floatfmt=".4g"), ""]
        elif body:
            lines += [body, ""]
    return "\n".join(lines)


def _html(title: str, sections, out_dir: Path) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><p>written {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}</p>"]  # fmt: skip
    for title, body in sections:
        if title.startswith("figure:"):
            data = base64.b64encode((out_dir / title.removeprefix("figure:")).read_bytes()).decode()
            parts.append(f"<img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>")
            continue
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if isinstance(body, pd.DataFrame):
            parts.append(body.to_html(index=False, float_format=lambda v: f"{v:.4g}"))
        elif body:
            parts.append(f"<pre>{html.escape(body)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)
