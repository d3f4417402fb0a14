"""Paired statistics for comparing encoders on the same images: Wilcoxon signed-rank, the sign-flip permutation
test and a paired bootstrap of the mean difference (all from scipy.stats), effect sizes, Holm correction, and a
ranking with CIs.

Every test of a comparison a vs b has the same stated alternative about d = a − b: 'two-sided' (d differs from
0), 'greater' (a > b) or 'less' (a < b). Pairs are matched by image id; images present for only one side are
counted and reported, never dropped silently.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats as sps

Alternative = Literal["two-sided", "greater", "less"]

# Resamples evaluated at once: scipy otherwise holds n_resamples x n_images values (400 MB at 10,000 x 5,000);
# 2,000 keeps it under 100 MB and was the fastest batch measured at n = 5,000.
_BATCH = 2000


@dataclass(frozen=True)
class PairedComparison:
    a: str
    b: str
    alternative: str  # about mean(a − b): two-sided, greater (a > b), less (a < b)
    n_pairs: int
    n_only_a: int
    n_only_b: int
    mean_a: float
    mean_b: float
    mean_diff: float  # mean(a − b)
    diff_ci_low: float  # two-sided 95% bootstrap CI of mean(a − b)
    diff_ci_high: float
    ci_method: str  # BCa, or percentile where BCa is undefined (e.g. all differences equal)
    wilcoxon_statistic: float
    wilcoxon_p: float
    permutation_p: float
    permutation_exact: bool  # all 2^n sign flips enumerated (else Monte Carlo)
    bootstrap_p: float
    rank_biserial: float
    holm_p_wilcoxon: float = float("nan")
    holm_p_permutation: float = float("nan")
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


def _tail_p(null: np.ndarray, observed: float, alternative: Alternative) -> float:
    """Monte Carlo p-value of `observed` against null draws, counting the observed value itself (+1)."""
    if alternative == "two-sided":
        extreme = np.abs(null) >= abs(observed)
    elif alternative == "greater":
        extreme = null >= observed
    else:
        extreme = null <= observed
    return float((1 + np.sum(extreme)) / (1 + null.size))


def bootstrap_mean_diff(
    diff: np.ndarray, n_boot: int, seed: int, alternative: Alternative = "two-sided", confidence: float = 0.95
) -> tuple[float, float, float, str]:
    """Two-sided CI of the mean paired difference (BCa) and a bootstrap p-value under `alternative`.

    The p-value resamples the differences re-centred on zero (the null of no mean difference) and counts how
    often the resampled mean is at least as extreme as the observed one. It is liberal at small n (the
    permutation test is the exact reference there).
    """
    rng = np.random.default_rng(seed)
    method = "BCa"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BCa warns and returns NaN on degenerate samples; handled below
        ci = sps.bootstrap((diff,), np.mean, n_resamples=n_boot, method="BCa", confidence_level=confidence,
                           batch=_BATCH, random_state=rng).confidence_interval  # fmt: skip
        low, high = ci.low, ci.high
    # BCa is undefined when every difference is equal; scipy then returns NaN, or (rounding) a finite, even
    # inverted, interval: decide on the data, not on scipy's output.
    if np.all(diff == diff[0]) or not (np.isfinite(low) and np.isfinite(high)):
        method = "percentile"
        ci = sps.bootstrap((diff,), np.mean, n_resamples=n_boot, method="percentile",
                           confidence_level=confidence, batch=_BATCH, random_state=rng).confidence_interval  # fmt: skip
        low, high = ci.low, ci.high
    null = sps.bootstrap(
        (diff - diff.mean(),),
        np.mean,
        n_resamples=n_boot,
        method="percentile",
        batch=_BATCH,
        random_state=rng,
    ).bootstrap_distribution
    return float(low), float(high), _tail_p(null, float(diff.mean()), alternative), method


def _mean(d: np.ndarray, axis: int) -> np.ndarray:
    return np.mean(d, axis=axis)


def permutation_p(
    x: np.ndarray, y: np.ndarray, n_resamples: int, seed: int, alternative: Alternative = "two-sided"
) -> tuple[float, bool]:
    """Paired sign-flip permutation test of mean(x − y): exact when 2^n <= n_resamples, else Monte Carlo.

    Swapping x_i and y_i flips the sign of d_i = x_i − y_i, so this is scipy's one-sample 'samples' test on the
    differences (same p-values as the two-sample paired form, twice as fast)."""
    result = sps.permutation_test(
        (x - y,), _mean, permutation_type="samples", alternative=alternative,
        n_resamples=n_resamples, vectorized=True, batch=_BATCH, random_state=np.random.default_rng(seed),
    )  # fmt: skip
    return float(result.pvalue), 2 ** int(x.size) <= n_resamples  # Python ints: no overflow at n = 5,000


def compare(
    a_name: str,
    a: pd.Series,
    b_name: str,
    b: pd.Series,
    n_boot: int,
    seed: int,
    alternative: Alternative = "two-sided",
    n_permutations: int = 10_000,
) -> PairedComparison:
    x, y, only_a, only_b = match_by_id(a, b)
    if x.size < 2:
        raise ValueError(f"{a_name} vs {b_name}: only {x.size} images in common; cannot compare")
    _check_finite(f"{a_name} vs {b_name}", np.concatenate([x, y]))
    diff = x - y
    if np.all(diff == 0):
        w_stat, w_p, perm_p, exact = 0.0, 1.0, 1.0, True
    else:
        w = sps.wilcoxon(x, y, alternative=alternative)
        w_stat, w_p = float(w.statistic), float(w.pvalue)
        perm_p, exact = permutation_p(x, y, n_permutations, seed, alternative)
    low, high, boot_p, ci_method = bootstrap_mean_diff(diff, n_boot, seed, alternative)
    return PairedComparison(
        a_name, b_name, alternative, int(x.size), only_a, only_b, float(x.mean()), float(y.mean()),
        float(diff.mean()), low, high, ci_method, w_stat, w_p, perm_p, exact, boot_p, rank_biserial(diff),
    )  # fmt: skip


def _check_finite(what: str, values: np.ndarray) -> None:
    """NaN compares as no difference and sorts last: a test or a ranking over it would look significant."""
    bad = int(np.sum(~np.isfinite(values)))
    if bad:
        raise ValueError(f"{what}: {bad} of {values.size} values are not finite (NaN or inf); leave those images "
                         "out first")  # fmt: skip


def holm(p_values: list[float] | np.ndarray) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (step-down, monotone, capped at 1), in the input order."""
    p = np.asarray(p_values, float)
    _check_finite("Holm's p-values", p)
    order = np.argsort(p)
    m = p.size
    adjusted_sorted = np.maximum.accumulate((m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(adjusted_sorted, 1.0)
    return adjusted


def compare_family(
    scores: dict[str, pd.Series],
    pairs: list[tuple[str, str, Alternative]],
    n_boot: int,
    seed: int,
    n_permutations: int = 10_000,
) -> list[PairedComparison]:
    """All requested comparisons (a, b, alternative), with Holm correction across the family for each test."""
    results = [
        compare(a, scores[a], b, scores[b], n_boot, seed + i, alternative, n_permutations)
        for i, (a, b, alternative) in enumerate(pairs)
    ]
    if not results:
        return []
    adjusted = {test: holm([getattr(r, f"{test}_p") for r in results])
                for test in ("wilcoxon", "permutation", "bootstrap")}  # fmt: skip
    return [
        PairedComparison(**{**r.to_dict(), **{f"holm_p_{t}": float(adjusted[t][i]) for t in adjusted}})
        for i, r in enumerate(results)
    ]


def mean_ci(
    values: np.ndarray, n_boot: int, seed: int, confidence: float = 0.95
) -> tuple[float, float, float]:
    """The mean and its percentile bootstrap CI (the interval is the mean itself when every value is equal)."""
    v = np.asarray(values, float)
    if np.all(v == v[0]):
        return float(v[0]), float(v[0]), float(v[0])
    ci = sps.bootstrap((v,), np.mean, n_resamples=n_boot, method="percentile", confidence_level=confidence,
                       batch=_BATCH, random_state=np.random.default_rng(seed)).confidence_interval  # fmt: skip
    return float(v.mean()), float(ci.low), float(ci.high)


def ranking(
    scores: dict[str, pd.Series], comparisons: list[PairedComparison], n_boot: int, seed: int, alpha: float
) -> pd.DataFrame:
    """Encoders by mean score (higher is better) with bootstrap CIs and the encoders each is not
    significantly different from (two-sided Holm-adjusted Wilcoxon p >= alpha). A one-sided test that fails says
    nothing of a tie (B far above A fails "A greater than B" too), and a pair not compared is not a difference: where
    some pair has no two-sided test, `not_tested_two_sided_against` names them."""
    rows = []
    for i, (name, values) in enumerate(scores.items()):
        v = values.to_numpy(float)
        _check_finite(f"scores of {name}", v)
        mean, low, high = mean_ci(v, n_boot, seed + 1000 + i)
        rows.append({"encoder": name, "n_images": v.size, "mean": mean, "ci_low": low, "ci_high": high})
    table = pd.DataFrame(rows).sort_values("mean", ascending=False, kind="stable").reset_index(drop=True)
    table.insert(
        0, "rank", table["mean"].rank(method="min", ascending=False).astype(int)
    )  # equal means: one rank
    tied = {name: [] for name in scores}
    two_sided = [c for c in comparisons if c.alternative == "two-sided"]
    for c in two_sided:
        if c.holm_p_wilcoxon >= alpha:
            tied[c.a].append(c.b)
            tied[c.b].append(c.a)
    table["not_significantly_different_from"] = [", ".join(sorted(tied[n])) or "-" for n in table["encoder"]]
    tested = {frozenset((c.a, c.b)) for c in two_sided}
    untested = {n: sorted(m for m in scores if m != n and frozenset((n, m)) not in tested) for n in scores}
    if any(untested.values()):
        table["not_tested_two_sided_against"] = [", ".join(untested[n]) or "-" for n in table["encoder"]]
    return table
