"""Paired statistics for comparing encoders on the same images: Wilcoxon signed-rank (scipy), paired bootstrap
of the mean difference (scipy.stats.bootstrap), effect sizes, Holm correction, and a ranking with CIs.

Pairs are matched by image id; images present for only one side are counted and reported, never dropped silently.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps


@dataclass(frozen=True)
class PairedComparison:
    a: str
    b: str
    n_pairs: int
    n_only_a: int
    n_only_b: int
    mean_a: float
    mean_b: float
    mean_diff: float  # mean(a - b)
    diff_ci_low: float
    diff_ci_high: float
    wilcoxon_statistic: float
    wilcoxon_p: float
    bootstrap_p: float
    rank_biserial: float
    holm_p_wilcoxon: float = float("nan")
    holm_p_bootstrap: float = float("nan")

    def to_dict(self) -> dict:
        return asdict(self)


def match_by_id(a: pd.Series, b: pd.Series) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Values of a and b (Series indexed by image id) on their common ids, plus how many ids each has alone."""
    common = a.index.intersection(b.index).sort_values()
    return (
        a.loc[common].to_numpy(float),
        b.loc[common].to_numpy(float),
        len(a.index.difference(common)),
        len(b.index.difference(common)),
    )


def rank_biserial(diff: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation: (W+ − W−) / (W+ + W−) over non-zero differences."""
    d = diff[diff != 0]
    if d.size == 0:
        return 0.0
    ranks = sps.rankdata(np.abs(d))
    w_plus, w_minus = ranks[d > 0].sum(), ranks[d < 0].sum()
    return float((w_plus - w_minus) / (w_plus + w_minus))


def bootstrap_mean_diff(
    diff: np.ndarray, n_boot: int, seed: int, confidence: float = 0.95
) -> tuple[float, float, float]:
    """Percentile CI of the mean paired difference and a two-sided bootstrap p-value.

    The p-value resamples the differences re-centred on zero (the null of no mean difference) and counts how
    often the resampled mean is at least as far from zero as the observed one.
    """
    rng = np.random.default_rng(seed)
    ci = sps.bootstrap((diff,), np.mean, n_resamples=n_boot, method="percentile", confidence_level=confidence,
                       random_state=rng).confidence_interval  # fmt: skip
    null = sps.bootstrap(
        (diff - diff.mean(),), np.mean, n_resamples=n_boot, method="percentile", random_state=rng
    )
    null_means = null.bootstrap_distribution
    p = (1 + np.sum(np.abs(null_means) >= abs(diff.mean()))) / (1 + n_boot)
    return float(ci.low), float(ci.high), float(p)


def compare(a_name: str, a: pd.Series, b_name: str, b: pd.Series, n_boot: int, seed: int) -> PairedComparison:
    x, y, only_a, only_b = match_by_id(a, b)
    if x.size < 2:
        raise ValueError(f"{a_name} vs {b_name}: only {x.size} images in common; cannot compare")
    diff = x - y
    if np.all(diff == 0):
        w_stat, w_p = 0.0, 1.0
    else:
        w = sps.wilcoxon(x, y)
        w_stat, w_p = float(w.statistic), float(w.pvalue)
    low, high, boot_p = bootstrap_mean_diff(diff, n_boot, seed)
    return PairedComparison(a_name, b_name, int(x.size), only_a, only_b, float(x.mean()), float(y.mean()),
                            float(diff.mean()), low, high, w_stat, w_p, boot_p, rank_biserial(diff))  # fmt: skip


def holm(p_values: list[float] | np.ndarray) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (step-down, monotone, capped at 1), in the input order."""
    p = np.asarray(p_values, float)
    order = np.argsort(p)
    m = p.size
    adjusted_sorted = np.maximum.accumulate((m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(adjusted_sorted, 1.0)
    return adjusted


def compare_family(
    scores: dict[str, pd.Series], pairs: list[tuple[str, str]], n_boot: int, seed: int
) -> list[PairedComparison]:
    """All requested comparisons, with Holm correction across the family (both tests)."""
    results = [compare(a, scores[a], b, scores[b], n_boot, seed + i) for i, (a, b) in enumerate(pairs)]
    if not results:
        return []
    holm_w = holm([r.wilcoxon_p for r in results])
    holm_b = holm([r.bootstrap_p for r in results])
    return [
        PairedComparison(**{**r.to_dict(), "holm_p_wilcoxon": float(hw), "holm_p_bootstrap": float(hb)})
        for r, hw, hb in zip(results, holm_w, holm_b, strict=True)
    ]


def ranking(
    scores: dict[str, pd.Series], comparisons: list[PairedComparison], n_boot: int, seed: int, alpha: float
) -> pd.DataFrame:
    """Encoders by mean score (higher is better) with bootstrap CIs and the encoders each is not
    significantly different from (Holm-adjusted Wilcoxon p >= alpha)."""
    rows = []
    for i, (name, values) in enumerate(scores.items()):
        v = values.to_numpy(float)
        ci = sps.bootstrap((v,), np.mean, n_resamples=n_boot, method="percentile",
                           random_state=np.random.default_rng(seed + 1000 + i)).confidence_interval  # fmt: skip
        rows.append({"encoder": name, "n_images": v.size, "mean": float(v.mean()), "ci_low": float(ci.low),
                     "ci_high": float(ci.high)})  # fmt: skip
    table = pd.DataFrame(rows).sort_values("mean", ascending=False).reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    tied = {name: [] for name in scores}
    for c in comparisons:
        if c.holm_p_wilcoxon >= alpha:
            tied[c.a].append(c.b)
            tied[c.b].append(c.a)
    table["not_significantly_different_from"] = [", ".join(sorted(tied[n])) or "-" for n in table["encoder"]]
    return table
