"""Known answers for the statistics (pipeline/science/stats.py) and the operator fits (pipeline/science/operator_fits.py).

Every expected value is worked out by hand in a comment or computed independently with numpy / scipy / itertools,
never by calling the code under test a second time. Each test is there to fail for a specific slip: a sign swap,
a dropped symmetrisation, a transposed solution, a one-sided p-value where two-sided was asked, Bonferroni in
place of Holm, a missing per-token normalisation, an off-by-one boundary in the eigenvalue bands.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
from scipy import stats as sps

from pipeline.science import operator_fits as of
from pipeline.science import stats
from pipeline.stages.operators import _normalized_tokens

ALTERNATIVES = ("two-sided", "greater", "less")


def _series(values, ids=None) -> pd.Series:
    ids = ids if ids is not None else np.arange(len(values))
    return pd.Series(np.asarray(values, float), index=pd.Index(ids, name="image_id"))


def _rotation_2d(degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def _unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------------------------
# Rank-biserial correlation
# --------------------------------------------------------------------------------------------------------------


def test_rank_biserial_of_one_two_minus_three_four_is_plus_zero_point_four():
    # |d| = 1, 2, 3, 4 -> ranks 1, 2, 3, 4; W+ = 1 + 2 + 4 = 7, W- = 3; r = (7 - 3) / (7 + 3) = +0.4
    assert stats.rank_biserial(np.array([1.0, 2.0, -3.0, 4.0])) == pytest.approx(0.4, abs=1e-12)
    # mirrored differences flip the sign
    assert stats.rank_biserial(np.array([-1.0, -2.0, 3.0, -4.0])) == pytest.approx(-0.4, abs=1e-12)


def test_rank_biserial_drops_zero_differences_and_uses_mid_ranks_for_ties():
    # the zero is dropped, the rest is the +0.4 case above
    assert stats.rank_biserial(np.array([0.0, 1.0, 2.0, -3.0, 4.0])) == pytest.approx(0.4, abs=1e-12)
    # |d| = 1, 1, 2 -> mid-ranks 1.5, 1.5, 3; W+ = 1.5 + 3 = 4.5, W- = 1.5; r = 3 / 6 = 0.5
    assert stats.rank_biserial(np.array([1.0, -1.0, 2.0])) == pytest.approx(0.5, abs=1e-12)


def test_rank_biserial_of_all_zero_differences_is_zero():
    assert stats.rank_biserial(np.zeros(4)) == 0.0


# --------------------------------------------------------------------------------------------------------------
# Bootstrap of the mean difference: p-value direction, CI method
# --------------------------------------------------------------------------------------------------------------


def _diffs_with_t(t: float, seed: int, n: int = 100) -> np.ndarray:
    """n heavy-tailed differences rescaled to sample sd exactly 1 and mean t/sqrt(n): one-sample t statistic = t."""
    z = np.random.default_rng(seed).standard_t(df=8, size=n)
    return (z - z.mean()) / z.std(ddof=1) + t / np.sqrt(n)


# Tolerances measured over 4 t values x 40 seeds (n = 100, n_boot = 2000): |bootstrap p - t-test p| reached
# 0.039 (two-sided) and 0.035 (one-sided); |p_two - 2 min(p_greater, p_less)| reached 0.054 (the bootstrap null
# inherits the sample's skew). Monte Carlo sd of a p near 0.3 at n_boot = 2000 is ~0.01. The t values used here
# make the slips large: one-sided for two-sided halves p (0.32 -> 0.16 at t = 1), a swapped tail gives 1 - p.
T_TEST_TOL, TWO_MIN_TOL = 0.05, 0.07


@pytest.mark.parametrize("t", [1.0, -1.2, 0.6])
@pytest.mark.parametrize("seed", range(3))
def test_bootstrap_p_values_agree_with_the_one_sample_t_test_for_every_alternative(t, seed):
    d = _diffs_with_t(t, seed)
    for alternative in ALTERNATIVES:
        _, _, p, _ = stats.bootstrap_mean_diff(d, n_boot=2000, seed=seed, alternative=alternative)
        expected = sps.ttest_1samp(d, 0.0, alternative=alternative).pvalue
        assert p == pytest.approx(expected, abs=T_TEST_TOL), alternative


@pytest.mark.parametrize("t", [1.0, -1.2, 0.6])
def test_bootstrap_two_sided_p_is_about_twice_the_smaller_one_sided_p(t):
    d = _diffs_with_t(t, seed=11)
    p = {alt: stats.bootstrap_mean_diff(d, n_boot=2000, seed=5, alternative=alt)[2] for alt in ALTERNATIVES}
    assert p["two-sided"] == pytest.approx(2 * min(p["greater"], p["less"]), abs=TWO_MIN_TOL)
    # the tail in the direction of the observed mean is the small one
    assert (p["greater"] < p["less"]) == (t > 0)


def test_bootstrap_p_of_constant_positive_differences_is_the_smallest_possible_in_the_right_tails():
    # The re-centred null is all zeros; the observed mean is 0.2. Counting the observed value itself (+1):
    # two-sided |0| >= 0.2 never -> 1/(n_boot+1); greater 0 >= 0.2 never -> 1/(n_boot+1); less 0 <= 0.2 always -> 1.
    n_boot = 499
    d = np.full(10, 0.2)
    p = {alt: stats.bootstrap_mean_diff(d, n_boot=n_boot, seed=0, alternative=alt)[2] for alt in ALTERNATIVES}
    assert p == pytest.approx({"two-sided": 1 / 500, "greater": 1 / 500, "less": 1.0})
    p_neg = {
        alt: stats.bootstrap_mean_diff(-d, n_boot=n_boot, seed=0, alternative=alt)[2] for alt in ALTERNATIVES
    }
    assert p_neg == pytest.approx({"two-sided": 1 / 500, "greater": 1.0, "less": 1 / 500})
    # the default alternative is two-sided (a 'less' default would give 1.0 here)
    assert stats.bootstrap_mean_diff(d, n_boot=n_boot, seed=0)[2] == pytest.approx(1 / 500)


def test_bootstrap_p_counts_null_draws_tied_with_the_observed_mean_as_extreme():
    # all differences 0: null draws and the observed mean are all exactly 0, so every draw is "at least as
    # extreme" in every direction -> p = (1 + n_boot) / (1 + n_boot) = 1 (strict inequalities would give 1/(n+1))
    for alternative in ALTERNATIVES:
        assert stats.bootstrap_mean_diff(np.zeros(10), n_boot=99, seed=0, alternative=alternative)[2] == 1.0


def test_bootstrap_results_are_reproducible_from_the_seed_and_change_with_it():
    d = _diffs_with_t(1.0, seed=8, n=30)
    first = stats.bootstrap_mean_diff(d, n_boot=500, seed=9, alternative="greater")
    assert stats.bootstrap_mean_diff(d, n_boot=500, seed=9, alternative="greater") == first
    other = stats.bootstrap_mean_diff(d, n_boot=500, seed=10, alternative="greater")
    assert other[0] != first[0] and other[2] != first[2]


def test_bootstrap_ci_is_scipys_two_sided_95_percent_bca_interval():
    d = _diffs_with_t(2.0, seed=3, n=40)
    low, high, _, method = stats.bootstrap_mean_diff(d, n_boot=999, seed=42)
    expected = sps.bootstrap((d,), np.mean, n_resamples=999, method="BCa", confidence_level=0.95,
                             random_state=np.random.default_rng(42)).confidence_interval  # fmt: skip
    assert method == "BCa"
    assert (low, high) == pytest.approx((expected.low, expected.high), rel=1e-12)
    assert low < d.mean() < high


def test_bootstrap_ci_uses_the_requested_confidence_level():
    d = _diffs_with_t(2.0, seed=4, n=40)
    low, high, _, _ = stats.bootstrap_mean_diff(d, n_boot=999, seed=7, confidence=0.8)
    expected = sps.bootstrap((d,), np.mean, n_resamples=999, method="BCa", confidence_level=0.8,
                             random_state=np.random.default_rng(7)).confidence_interval  # fmt: skip
    assert (low, high) == pytest.approx((expected.low, expected.high), rel=1e-12)


def test_bootstrap_ci_falls_back_to_percentile_when_all_differences_are_equal():
    # BCa is undefined (zero jackknife variance): every resampled mean is 0.2, so the percentile CI is [0.2, 0.2].
    low, high, _, method = stats.bootstrap_mean_diff(np.full(10, 0.2), n_boot=200, seed=0)
    assert method == "percentile"
    assert (low, high) == pytest.approx((0.2, 0.2), abs=1e-12)


def test_equal_differences_get_a_percentile_ci_whatever_their_number():
    for n in range(8, 21):
        low, high, _, method = stats.bootstrap_mean_diff(np.full(n, 0.2), n_boot=200, seed=0)
        assert method == "percentile" and low <= high, n


# --------------------------------------------------------------------------------------------------------------
# Sign-flip permutation test
# --------------------------------------------------------------------------------------------------------------

# d = x - y = [1, 2, 3, 4, -5], observed sum 5 (mean 1). A sign flip negates a subset N of {1, 2, 3, 4, 5}
# (magnitudes) and gives sum 15 - 2 sum(N).
#   sum >= 5  <=> sum(N) <= 5: {}, {1}..{5}, {1,2}, {1,3}, {1,4}, {2,3}        -> 10 of 32: p_greater = 0.3125
#   sum <= 5  <=> sum(N) >= 5: 32 - #{sum(N) <= 4} = 32 - 7                    -> 25 of 32: p_less    = 0.78125
#   |sum| >= 5: 10 + 10 (the null is symmetric)                                 -> 20 of 32: p_two     = 0.625
PERM_X = np.array([11.0, 12.0, 13.0, 14.0, 5.0])
PERM_Y = np.full(5, 10.0)
PERM_HAND = {"two-sided": 0.625, "greater": 0.3125, "less": 0.78125}


def _enumerated_sign_flip_p(d: np.ndarray) -> dict[str, float]:
    flips = np.array(list(itertools.product([1.0, -1.0], repeat=d.size)))
    null = (flips * d).mean(axis=1)
    observed, eps = d.mean(), 1e-9
    return {
        "two-sided": float(np.mean(np.abs(null) >= abs(observed) - eps)),
        "greater": float(np.mean(null >= observed - eps)),
        "less": float(np.mean(null <= observed + eps)),
    }


def test_the_hand_count_of_sign_flips_matches_an_itertools_enumeration():
    assert _enumerated_sign_flip_p(PERM_X - PERM_Y) == pytest.approx(PERM_HAND, abs=1e-12)


@pytest.mark.parametrize("alternative", ALTERNATIVES)
def test_the_permutation_p_for_five_pairs_is_the_exact_enumeration_of_all_32_sign_flips(alternative):
    p, exact = stats.permutation_p(PERM_X, PERM_Y, n_resamples=10_000, seed=0, alternative=alternative)
    assert exact is True
    assert p == pytest.approx(PERM_HAND[alternative], abs=1e-12)


def test_the_permutation_test_is_exact_from_exactly_two_to_the_n_resamples():
    # 2^5 = 32 distinct sign flips: 32 resamples enumerate them all, 31 do not.
    p, exact = stats.permutation_p(PERM_X, PERM_Y, n_resamples=32, seed=0)
    assert exact is True and p == pytest.approx(0.625, abs=1e-12)
    assert stats.permutation_p(PERM_X, PERM_Y, n_resamples=31, seed=0)[1] is False


@pytest.mark.parametrize("alternative", ALTERNATIVES)
def test_a_monte_carlo_permutation_p_uses_n_resamples_draws_from_the_seeded_generator(alternative):
    rng = np.random.default_rng(22)
    x, y = rng.normal(size=14), rng.normal(size=14)
    p, exact = stats.permutation_p(x, y, n_resamples=300, seed=4, alternative=alternative)
    reference = sps.permutation_test(
        (x, y), lambda u, v, axis: np.mean(u - v, axis=axis), permutation_type="samples", alternative=alternative,
        n_resamples=300, vectorized=True, random_state=np.random.default_rng(4),
    )  # fmt: skip
    assert exact is False and p == reference.pvalue
    assert stats.permutation_p(x, y, n_resamples=300, seed=5, alternative=alternative)[0] != p


@pytest.mark.parametrize("alternative", ALTERNATIVES)
def test_a_monte_carlo_permutation_p_is_close_to_the_exact_enumeration(alternative):
    rng = np.random.default_rng(21)
    x = rng.normal(0.5, 0.1, 12)
    y = x - 0.03 + rng.normal(0, 0.05, 12)
    expected = _enumerated_sign_flip_p(x - y)[alternative]  # 4096 flips
    p, exact = stats.permutation_p(x, y, n_resamples=2000, seed=1, alternative=alternative)
    assert exact is False
    # binomial sd of a Monte Carlo p at 2000 resamples is <= 0.011; 0.04 is > 3.5 sd
    assert p == pytest.approx(expected, abs=0.04)


# --------------------------------------------------------------------------------------------------------------
# compare: the stated alternative reaches every test, and the summary numbers are right
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alternative", ALTERNATIVES)
def test_compare_passes_its_alternative_to_wilcoxon_permutation_and_bootstrap(alternative):
    rng = np.random.default_rng(31)
    a = rng.normal(0.6, 0.1, 40)
    b = a - 0.012 + rng.normal(0, 0.04, 40)  # a mildly better: the one-sided p-values differ a lot
    r = stats.compare("a", _series(a), "b", _series(b), n_boot=2000, seed=0, alternative=alternative,
                      n_permutations=4000)  # fmt: skip
    w = sps.wilcoxon(a, b, alternative=alternative)
    assert r.alternative == alternative
    assert r.wilcoxon_p == pytest.approx(w.pvalue, rel=1e-12) and r.wilcoxon_statistic == w.statistic
    d = a - b
    t_p = sps.ttest_1samp(d, 0.0, alternative=alternative).pvalue
    assert r.bootstrap_p == pytest.approx(t_p, abs=T_TEST_TOL)
    assert r.permutation_p == pytest.approx(t_p, abs=T_TEST_TOL) and r.permutation_exact is False


def test_compare_on_five_pairs_reports_the_exact_permutation_p_and_the_hand_summary():
    r = stats.compare("a", _series(PERM_X), "b", _series(PERM_Y), n_boot=200, seed=0, alternative="greater")
    assert r.permutation_exact is True and r.permutation_p == pytest.approx(0.3125, abs=1e-12)
    # means 11, 10; d = [1, 2, 3, 4, -5]: ranks 1..5, W+ = 10, W- = 5, r = 5/15
    assert (r.n_pairs, r.mean_a, r.mean_b, r.mean_diff) == (5, 11.0, 10.0, 1.0)
    assert r.rank_biserial == pytest.approx(1 / 3, abs=1e-12)
    # Wilcoxon 'greater' statistic is W+ = 10; exact p = #{subsets of ranks 1..5 with sum >= 10} / 32, i.e. the
    # complements with sum <= 5, the 10 subsets counted above: 10/32
    assert r.wilcoxon_statistic == 10.0 and r.wilcoxon_p == pytest.approx(10 / 32, abs=1e-12)
    assert r.ci_method == "BCa" and r.diff_ci_low < 1.0 < r.diff_ci_high


def test_compare_of_identical_scores_reports_no_difference_with_p_one():
    a = _series([0.3, 0.5, 0.7, 0.2])
    r = stats.compare("a", a, "b", a.copy(), n_boot=100, seed=0)
    assert (r.wilcoxon_statistic, r.wilcoxon_p, r.permutation_p, r.permutation_exact) == (0.0, 1.0, 1.0, True)
    # the re-centred null is all zeros and the observed mean is 0: every draw is as extreme -> p = 1
    assert r.bootstrap_p == 1.0 and r.rank_biserial == 0.0 and r.mean_diff == 0.0
    assert (r.diff_ci_low, r.diff_ci_high, r.ci_method) == (0.0, 0.0, "percentile")


def test_compare_of_twenty_identical_scores_reports_p_one_without_running_the_tests():
    # scipy's Wilcoxon returns NaN for 20 zero differences; compare reports the known answer instead
    a = _series(np.linspace(0.1, 0.9, 20))
    r = stats.compare("a", a, "b", a.copy(), n_boot=100, seed=0, n_permutations=100)
    assert (r.wilcoxon_statistic, r.wilcoxon_p, r.permutation_p, r.permutation_exact) == (0.0, 1.0, 1.0, True)


def test_integer_scores_are_compared_as_floats():
    # uint8 scores: a - b must be -1, not 255 (unsigned wrap-around)
    a = pd.Series(np.array([1, 2, 3, 4], np.uint8), index=pd.Index([1, 2, 3, 4], name="image_id"))
    b = pd.Series(np.array([2, 3, 4, 5], np.uint8), index=pd.Index([1, 2, 3, 4], name="image_id"))
    x, y, _, _ = stats.match_by_id(a, b)
    assert x.dtype == np.float64 and y.dtype == np.float64
    r = stats.compare("a", a, "b", b, n_boot=100, seed=0)
    assert r.mean_diff == -1.0 and r.rank_biserial == -1.0


def _scipy_permutation_p(x, y, n_resamples, seed, alternative):
    return sps.permutation_test(
        (x, y), lambda u, v, axis: np.mean(u - v, axis=axis), permutation_type="samples", alternative=alternative,
        n_resamples=n_resamples, vectorized=True, random_state=np.random.default_rng(seed),
    ).pvalue  # fmt: skip


def test_compare_runs_10000_seeded_sign_flips_by_default_and_is_reproducible():
    rng = np.random.default_rng(32)
    a = rng.normal(0.5, 0.1, 16)
    b = a - 0.01 + rng.normal(0, 0.03, 16)  # 2^16 > 10000: Monte Carlo
    r = stats.compare("a", _series(a), "b", _series(b), n_boot=300, seed=6, alternative="greater")
    assert r.permutation_exact is False
    assert r.permutation_p == _scipy_permutation_p(a, b, 10_000, 6, "greater")
    again = stats.compare("a", _series(a), "b", _series(b), n_boot=300, seed=6, alternative="greater")
    assert again == r
    other = stats.compare("a", _series(a), "b", _series(b), n_boot=300, seed=7, alternative="greater")
    assert other.bootstrap_p != r.bootstrap_p and other.diff_ci_low != r.diff_ci_low


def test_compare_refuses_fewer_than_two_common_images():
    with pytest.raises(ValueError, match="only 1 images in common"):
        stats.compare("a", _series([0.1, 0.2], ids=[1, 2]), "b", _series([0.3, 0.4], ids=[2, 3]), 100, 0)
    # two common images are enough
    r = stats.compare("a", _series([0.1, 0.2], ids=[1, 2]), "b", _series([0.3, 0.5], ids=[1, 2]), 100, 0)
    assert r.n_pairs == 2


# --------------------------------------------------------------------------------------------------------------
# Holm
# --------------------------------------------------------------------------------------------------------------


def test_holm_of_one_two_three_percent_is_three_four_four_percent_not_bonferroni():
    # sorted multipliers 3, 2, 1: 0.03, 0.04, 0.03 -> running max 0.03, 0.04, 0.04
    # (Bonferroni would give 0.03, 0.06, 0.09)
    assert stats.holm([0.01, 0.02, 0.03]) == pytest.approx([0.03, 0.04, 0.04], abs=1e-15)
    # input order is kept
    assert stats.holm([0.03, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04], abs=1e-15)


def test_holm_adjusts_float32_p_values_in_double_precision():
    p32 = np.array([0.01, 0.02, 0.03], np.float32)
    p64 = p32.astype(np.float64)
    assert stats.holm(p32) == pytest.approx([3 * p64[0], 2 * p64[1], 2 * p64[1]], rel=1e-15, abs=0)


def test_holm_is_monotone_in_the_raw_p_values_and_capped_at_one():
    # 0.4*3 = 1.2, 0.5*2 = 1.0, 0.6*1 = 0.6 -> running max 1.2, 1.2, 1.2 -> capped 1, 1, 1
    assert stats.holm([0.6, 0.4, 0.5]) == pytest.approx([1.0, 1.0, 1.0])
    p = np.random.default_rng(0).uniform(0, 0.2, 12)
    adjusted = stats.holm(p)
    order = np.argsort(p)
    assert np.all(np.diff(adjusted[order]) >= 0) and np.all(adjusted >= p) and np.all(adjusted <= 1)
    # a single p-value is its own Holm adjustment; an empty family is empty
    assert stats.holm([0.2]) == pytest.approx([0.2]) and stats.holm([]).size == 0


def test_compare_family_holm_adjusts_each_test_across_the_family_and_keeps_each_alternative():
    rng = np.random.default_rng(41)
    base = rng.normal(0.5, 0.1, 30)
    scores = {"a": _series(base + 0.02 + rng.normal(0, 0.03, 30)), "b": _series(base),
              "c": _series(base + rng.normal(0, 0.03, 30))}  # fmt: skip
    pairs = [("a", "b", "greater"), ("a", "c", "two-sided"), ("c", "b", "less")]
    family = stats.compare_family(scores, pairs, n_boot=300, seed=3, n_permutations=500)
    assert [(r.a, r.b, r.alternative) for r in family] == pairs
    for test in ("wilcoxon", "permutation", "bootstrap"):
        raw = np.array([getattr(r, f"{test}_p") for r in family])
        # Holm by hand: multiply the k-th smallest by (m - k), running max, cap at 1
        order = np.argsort(raw)
        hand = np.minimum(np.maximum.accumulate(raw[order] * np.array([3, 2, 1])), 1.0)
        expected = np.empty(3)
        expected[order] = hand
        assert [getattr(r, f"holm_p_{test}") for r in family] == pytest.approx(expected, abs=1e-15), test
    # the Wilcoxon p of each pair is scipy's with that pair's alternative
    for (a, b, alternative), r in zip(pairs, family, strict=True):
        expected_w = sps.wilcoxon(scores[a].to_numpy(), scores[b].to_numpy(), alternative=alternative).pvalue
        assert r.wilcoxon_p == pytest.approx(expected_w, rel=1e-12)
    assert stats.compare_family(scores, [], n_boot=100, seed=0) == []
    # pair i runs its sign flips from seed + i with the requested number of resamples (2^30 > 500: Monte Carlo)
    for i, ((a, b, alternative), r) in enumerate(zip(pairs, family, strict=True)):
        x, y = scores[a].to_numpy(), scores[b].to_numpy()
        assert r.permutation_p == _scipy_permutation_p(x, y, 500, 3 + i, alternative)
    # and 10000 by default
    default = stats.compare_family(scores, pairs[:1], n_boot=100, seed=3)[0]
    x, y = scores["a"].to_numpy(), scores["b"].to_numpy()
    assert default.permutation_p == _scipy_permutation_p(x, y, 10_000, 3, "greater")


def test_ranking_marks_ties_from_holm_adjusted_wilcoxon_at_alpha():
    rng = np.random.default_rng(51)
    base = rng.normal(0.5, 0.1, 25)
    scores = {"low": _series(base), "high": _series(base + 0.3), "mid": _series(base + 0.1)}

    def made_up(a, b, holm_p):
        return stats.PairedComparison(a, b, "two-sided", 25, 0, 0, 0, 0, 0, 0, 0, "BCa", 0, 0, 0, False, 0, 0,
                                      holm_p_wilcoxon=holm_p)  # fmt: skip

    # alpha = 0.05: p exactly at alpha is not significant (>=), just below it is
    comparisons = [made_up("high", "mid", 0.05), made_up("mid", "low", 0.0499), made_up("high", "low", 0.001)]
    table = stats.ranking(scores, comparisons, n_boot=200, seed=0, alpha=0.05).set_index("encoder")
    assert list(table.index) == ["high", "mid", "low"] and list(table["rank"]) == [1, 2, 3]
    assert table["not_significantly_different_from"].to_dict() == {"high": "mid", "mid": "high", "low": "-"}
    assert table.loc["mid", "mean"] == pytest.approx(base.mean() + 0.1) and table.loc["low", "n_images"] == 25
    for name in scores:
        assert table.loc[name, "ci_low"] < table.loc[name, "mean"] < table.loc[name, "ci_high"]
        # a 95% percentile CI of a mean of 25 values with sd 0.1 is about +-2 * 0.1 / 5 = +-0.04 wide
        assert 0.02 < table.loc[name, "ci_high"] - table.loc[name, "ci_low"] < 0.12


def test_ranking_table_has_its_columns_in_order_and_a_reproducible_percentile_ci_per_encoder():
    rng = np.random.default_rng(52)
    scores = {name: _series(rng.normal(mu, 0.1, 20)) for name, mu in [("x", 0.4), ("y", 0.6), ("z", 0.5)]}
    comparisons = [stats.PairedComparison(a, b, "two-sided", 20, 0, 0, 0, 0, 0, 0, 0, "BCa", 0, 0, 0, False, 0, 0,
                                          holm_p_wilcoxon=0.5) for a, b in [("y", "z"), ("y", "x")]]  # fmt: skip
    table = stats.ranking(scores, comparisons, n_boot=300, seed=5, alpha=0.05)
    assert list(table.columns) == ["rank", "encoder", "n_images", "mean", "ci_low", "ci_high",
                                   "not_significantly_different_from", "not_tested_two_sided_against"]  # fmt: skip
    assert list(table.index) == [0, 1, 2] and list(table["encoder"]) == ["y", "z", "x"]
    # y is tied with both others: names sorted and joined by ", "
    assert list(table["not_significantly_different_from"]) == ["x, z", "y", "y"]
    assert list(table["not_tested_two_sided_against"]) == [
        "-",
        "x",
        "z",
    ]  # x vs z was not compared: no tie, no gap
    one_sided = [stats.PairedComparison("x", "y", "greater", 20, 0, 0, 0, 0, 0, 0, 0, "BCa", 0, 0, 0, False, 0, 0,
                                        holm_p_wilcoxon=1.0)]  # y far above x: "x greater" fails  # fmt: skip
    pair = stats.ranking({k: scores[k] for k in ("x", "y")}, one_sided, n_boot=300, seed=5, alpha=0.05)
    assert list(pair["not_significantly_different_from"]) == ["-", "-"]  # a failed one-sided test is no tie
    assert list(pair["not_tested_two_sided_against"]) == ["x", "y"]
    # encoder i (in the scores' order) draws its percentile CI from seed + 1000 + i, so tables reproduce exactly
    table = table.set_index("encoder")
    for i, (name, values) in enumerate(scores.items()):
        ci = sps.bootstrap((values.to_numpy(),), np.mean, n_resamples=300, method="percentile",
                           random_state=np.random.default_rng(5 + 1000 + i)).confidence_interval  # fmt: skip
        assert (table.loc[name, "ci_low"], table.loc[name, "ci_high"]) == (ci.low, ci.high)


def test_ranking_averages_float32_scores_in_double_precision():
    # float32 arithmetic: 2^24 + 1 rounds back to 2^24, so a float32 mean of (2^24, 1, 1) is 5592405.33.. -> .5;
    # in float64 it is (2^24 + 2) / 3 = 5592406 exactly
    values = pd.Series(np.array([2.0**24, 1.0, 1.0], np.float32), index=pd.Index([0, 1, 2], name="image_id"))
    table = stats.ranking({"f32": values}, [], n_boot=50, seed=0, alpha=0.05)
    assert table.loc[0, "mean"] == 5592406.0


# --------------------------------------------------------------------------------------------------------------
# Operator fits
# --------------------------------------------------------------------------------------------------------------


def test_pair_stats_of_two_hand_pairs():
    # pairs (a, b): ((1, 0), (0, 1)) and ((0, 2), (3, 0))
    # Σ b aᵀ = [[0, 0], [1, 0]] + [[0, 6], [0, 0]] = [[0, 6], [1, 0]]; Σ a aᵀ = diag(1, 4); Σ‖b‖² = 1 + 9
    a = np.array([[1.0, 0.0], [0.0, 2.0]], np.float16)
    b = np.array([[0.0, 1.0], [3.0, 0.0]], np.float16)
    s = of.PairStats.of(a, b)
    assert s.cross_ba.dtype == np.float64 and s.gram_aa.dtype == np.float64
    assert np.array_equal(s.cross_ba, [[0.0, 6.0], [1.0, 0.0]])
    assert np.array_equal(s.gram_aa, np.diag([1.0, 4.0]))
    assert (s.sum_sq_b, s.n_pairs) == (10.0, 2)
    total = s + of.PairStats.of(a[:1], b[:1])
    assert np.array_equal(total.cross_ba, [[0.0, 6.0], [2.0, 0.0]])
    assert np.array_equal(total.gram_aa, np.diag([2.0, 4.0])) and (total.sum_sq_b, total.n_pairs) == (11.0, 3)


def test_pair_stats_round_tokens_to_float32_before_multiplying():
    # 1 + 2^-30 is 1 in float32: the products are float32 (BLAS) accumulated into float64, and Σ‖b‖² is taken
    # from the same float32 tokens, so all three statistics are exactly 1
    x = np.array([[1.0 + 2.0**-30]])
    s = of.PairStats.of(x, x)
    assert (s.cross_ba[0, 0], s.gram_aa[0, 0], s.sum_sq_b) == (1.0, 1.0, 1.0)


def test_procrustes_recovers_a_non_symmetric_rotation_not_its_transpose():
    # A rotates by 90 degrees about z: A != A.T, so a transposed solution is caught
    planted = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    a = _unit_rows(50, 3, 61)
    b = a @ planted.T  # b_i = A a_i
    op = of.procrustes(of.PairStats.of(a, b))
    assert np.abs(op - planted).max() < 1e-6 and np.abs(op - planted.T).max() > 1.0
    # scipy's orthogonal_procrustes(a, b) minimises ||a R - b|| over rows: R = A.T
    r, _ = scipy.linalg.orthogonal_procrustes(a, b)
    assert np.allclose(r, planted.T, atol=1e-6) and np.allclose(op, r.T, atol=1e-6)
    op_fit, facts = of.fit(of.PairStats.of(a, b), "procrustes")
    assert np.allclose(op_fit, planted, atol=1e-6) and facts == {}


def test_procrustes_of_noisy_pairs_is_the_orthogonal_matrix_scipy_finds():
    rng = np.random.default_rng(62)
    a = _unit_rows(200, 6, 63)
    b = a @ sps.ortho_group.rvs(6, random_state=64).T + 0.2 * rng.normal(size=(200, 6))
    op = of.procrustes(of.PairStats.of(a, b))
    r, _ = scipy.linalg.orthogonal_procrustes(a, b)
    assert np.allclose(op, r.T, atol=1e-5) and np.allclose(op @ op.T, np.eye(6), atol=1e-10)


def test_nearest_involution_of_a_60_degree_rotation_is_the_identity():
    # R(60°) = [[0.5, -0.866], [0.866, 0.5]]; its symmetric part is 0.5 I, both eigenvalues > 0 -> I.
    # Without symmetrising, eigh would read one triangle, [[0.5, 0.866], [0.866, 0.5]], with eigenvalues
    # 1.366 and -0.366, and return the reflection [[0, 1], [1, 0]].
    assert np.allclose(of.nearest_involution(_rotation_2d(60)), np.eye(2), atol=1e-12)
    # same rotation the other way round (the other triangle carries the +0.866)
    assert np.allclose(of.nearest_involution(_rotation_2d(-60)), np.eye(2), atol=1e-12)


def test_nearest_involution_takes_the_sign_of_the_symmetric_parts_eigenvalues():
    # symmetric part diag(0.3, -0.2), skew part +-5 off the diagonal -> diag(+1, -1)
    a = np.array([[0.3, 5.0], [-5.0, -0.2]])
    assert np.allclose(of.nearest_involution(a), np.diag([1.0, -1.0]), atol=1e-12)
    # in a rotated basis Q: Q diag(2, -1, 0.5) Q^T -> Q diag(1, -1, 1) Q^T
    q = np.linalg.qr(np.random.default_rng(64).normal(size=(3, 3)))[0]
    expected = q @ np.diag([1.0, -1.0, 1.0]) @ q.T
    assert np.allclose(of.nearest_involution(q @ np.diag([2.0, -1.0, 0.5]) @ q.T), expected, atol=1e-12)
    # a zero eigenvalue of the symmetric part is sent to +1 (the tie-break: eigenvalue >= 0)
    assert np.allclose(of.nearest_involution(np.diag([0.0, -1.0])), np.diag([1.0, -1.0]), atol=1e-12)


def test_the_involution_fit_reports_how_far_the_projection_moved_from_procrustes():
    # pairs with b = R(60°) a: Procrustes gives R(60°), the involution fit I; ||I - R||_F² = 2 (1-cos)² + 2 sin²
    # = 2 (0.25 + 0.75) = 2 -> distance sqrt(2)
    a = _unit_rows(40, 2, 65)
    op, facts = of.fit(of.PairStats.of(a, a @ _rotation_2d(60).T), "involution")
    assert np.allclose(op, np.eye(2), atol=1e-6)
    assert facts == {"distance_from_procrustes_fro": pytest.approx(np.sqrt(2), abs=1e-6)}
    with pytest.raises(ValueError, match="unknown fit type"):
        of.fit(of.PairStats.of(a, a), "rotation")


def test_the_involution_fit_is_the_least_squares_optimum_among_all_2d_symmetric_orthogonal_matrices():
    # In 2-D those are +-I and the reflections [[cos t, sin t], [sin t, -cos t]]: a fine grid of them bounds the
    # optimum. Anisotropic tokens turned by 100 degrees: the best involution is a reflection (residual 0.34); the
    # nearest involution to the Procrustes rotation is -I (1.29), the fit this method replaced.
    rng = np.random.default_rng(5)
    a = rng.normal(size=(200, 2)) * [3.0, 0.5]
    stats = of.PairStats.of(a, a @ _rotation_2d(100).T + 0.05 * rng.normal(size=(200, 2)))
    op, _ = of.fit(stats, "involution")
    angles = np.linspace(0, 2 * np.pi, 20001)
    candidates = [np.eye(2), -np.eye(2)] + [
        np.array([[np.cos(t), np.sin(t)], [np.sin(t), -np.cos(t)]]) for t in angles
    ]
    best = min(of.relative_residual(c, stats) for c in candidates)
    assert of.relative_residual(op, stats) == pytest.approx(best, abs=1e-7) and best == pytest.approx(
        0.344, abs=1e-3
    )
    assert of.relative_residual(of.nearest_involution(of.procrustes(stats)), stats) > 1.2


def test_least_squares_equals_numpy_lstsq_on_a_full_rank_case():
    rng = np.random.default_rng(66)
    a, b = rng.normal(size=(60, 5)), rng.normal(size=(60, 5))
    expected = np.linalg.lstsq(a, b, rcond=None)[0].T  # a Aᵀ ≈ b
    op, facts = of.fit(of.PairStats.of(a, b), "least_squares")
    assert np.allclose(op, expected, atol=1e-5) and facts == {"ridge": 0.0}


def test_least_squares_with_fewer_pairs_than_dimensions_is_lstsqs_minimum_norm_solution():
    rng = np.random.default_rng(67)
    a, b = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
    expected = np.linalg.lstsq(a, b, rcond=None)[0].T
    assert np.allclose(of.least_squares(of.PairStats.of(a, b)), expected, atol=1e-5)


def test_least_squares_keeps_the_weak_directions_of_anisotropic_tokens_and_recovers_a_planted_involution():
    # Unit tokens with one dominant direction: the Gram matrix's eigenvalues span ~1e6. A planted involution S
    # (40 eigenvalues +1, 24 at -1) maps them exactly; lstsq recovers it. A float32 cut-off (D x eps32) dropped 11
    # real directions: A was 0.22 off S with 22 eigenvalues inside the unit circle, "involution: FAILS".
    rng = np.random.default_rng(0)
    d, n = 64, 20_000
    u = sps.ortho_group.rvs(d, random_state=3)
    a = (rng.normal(size=(n, d)) * np.r_[5.0, np.logspace(0, -2.5, d - 1)]) @ u.T + 3 * u[:, 0]
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    v = sps.ortho_group.rvs(d, random_state=2)
    planted = (v * np.r_[[1.0] * 40, [-1.0] * 24]) @ v.T
    op = of.least_squares(of.PairStats.of(a, a @ planted.T))
    assert np.abs(op - planted).max() < 1e-5  # the tokens are rounded to float32, nothing else is lost
    spectrum = of.eigen_summary(op)
    assert (spectrum["n_near_plus_one"], spectrum["n_near_minus_one"]) == (40, 24)
    assert of.prediction_holds("involution", spectrum)


def test_pair_statistics_are_float64_sums_of_float32_tokens_in_blocks(monkeypatch):
    rng = np.random.default_rng(68)
    a, b = rng.normal(size=(50, 4)).astype(np.float32), rng.normal(size=(50, 4)).astype(np.float32)
    monkeypatch.setattr(of, "BLOCK_ROWS", 7)  # blocks that do not divide the rows
    s = of.PairStats.of(a, b)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    np.testing.assert_allclose(s.gram_aa, a64.T @ a64, rtol=1e-13)
    np.testing.assert_allclose(s.cross_ba, b64.T @ a64, rtol=1e-13)
    assert s.sum_sq_b == pytest.approx(float(np.sum(b64**2)), rel=1e-13) and s.n_pairs == 50


def test_ridge_shrinks_the_least_squares_operator_toward_zero_as_in_the_closed_form():
    # A = C (G + λ I)^-1; in 1-D with a = (1, 2), b = (2, 4): C = 10, G = 5 -> A = 10 / (5 + λ)
    a, b = np.array([[1.0], [2.0]]), np.array([[2.0], [4.0]])
    s = of.PairStats.of(a, b)
    for ridge, expected in [(0.0, 2.0), (5.0, 1.0), (15.0, 0.5), (1e9, 1e-8)]:
        assert of.least_squares(s, ridge)[0, 0] == pytest.approx(expected, rel=1e-6)
    assert of.least_squares(s)[0, 0] == pytest.approx(2.0, rel=1e-6)  # no ridge by default
    op, facts = of.fit(s, "least_squares", ridge=5.0)
    assert op[0, 0] == pytest.approx(1.0) and facts == {"ridge": 5.0}
    rng = np.random.default_rng(68)
    a, b = rng.normal(size=(30, 4)), rng.normal(size=(30, 4))
    s = of.PairStats.of(a, b)
    closed = (b.T @ a) @ np.linalg.inv(a.T @ a + 2.0 * np.eye(4))
    assert np.allclose(of.least_squares(s, 2.0), closed, atol=1e-5)
    norms = [np.linalg.norm(of.least_squares(s, r)) for r in (0.0, 1.0, 10.0, 100.0)]
    assert all(x > y for x, y in itertools.pairwise(norms))


def test_relative_residual_equals_the_direct_sum_of_squared_errors():
    rng = np.random.default_rng(69)
    a, b, op = rng.normal(size=(50, 4)), rng.normal(size=(50, 4)), rng.normal(size=(4, 4))
    direct = np.sqrt(np.sum((a @ op.T - b) ** 2) / np.sum(b**2))  # sqrt(Σ‖A a − b‖² / Σ‖b‖²)
    assert of.relative_residual(op, of.PairStats.of(a, b)) == pytest.approx(direct, rel=1e-5)
    # hand case: a = (1, 0), b = (0, 2), A = I: ‖A a − b‖² = 1 + 4 = 5, ‖b‖² = 4 -> sqrt(5/4)
    s = of.PairStats.of(np.array([[1.0, 0.0]]), np.array([[0.0, 2.0]]))
    assert of.relative_residual(np.eye(2), s) == pytest.approx(np.sqrt(5 / 4), rel=1e-12)
    # the zero operator leaves all of b: residual 1, also when Σ‖b‖² is below 1 (b = (0, 0.5): Σ‖b‖² = 0.25)
    assert of.relative_residual(np.zeros((4, 4)), of.PairStats.of(a, b)) == pytest.approx(1.0, rel=1e-12)
    small = of.PairStats.of(np.array([[1.0, 0.0]]), np.array([[0.0, 0.5]]))
    assert of.relative_residual(np.zeros((2, 2)), small) == pytest.approx(1.0, rel=1e-12)


def test_relative_residual_is_zero_not_nan_when_rounding_makes_the_sum_slightly_negative():
    # tr(A G Aᵀ) − 2 tr(A Cᵀ) + Σ‖b‖² = 1 − 2 + (1 − 2^-40) < 0 by rounding only: clipped to 0
    s = of.PairStats(np.eye(1), np.eye(1), 1.0 - 2.0**-40, 1)
    assert of.relative_residual(np.eye(1), s) == 0.0
    # all-zero targets and operator: 0 / 0 guarded, residual 0
    zero = of.PairStats.of(np.ones((2, 2)), np.zeros((2, 2)))
    assert of.relative_residual(np.zeros((2, 2)), zero) == 0.0


def _hand_spectrum_operator() -> np.ndarray:
    """Block diagonal: 0.5, 1.0, -1.0, 1.5 and a 2x2 block 1.05 R(90°) with eigenvalues ±1.05i."""
    op = np.zeros((6, 6))
    op[:4, :4] = np.diag([0.5, 1.0, -1.0, 1.5])
    op[4:, 4:] = 1.05 * _rotation_2d(90)
    return op


def test_eigen_summary_counts_a_hand_built_spectrum():
    # moduli 0.5, 1, 1, 1.5, 1.05, 1.05 with tol 0.1:
    #   inside (< 0.9): 0.5 -> 1; on (0.9..1.1): 1, 1, 1.05, 1.05 -> 4; outside (> 1.1): 1.5 -> 1
    #   near +1: 1.0 -> 1; near -1: -1.0 -> 1 (±1.05i are 1.45 away from ±1); spectral radius 1.5
    e = of.eigen_summary(_hand_spectrum_operator(), tol=0.1)
    counts = {k: e[k] for k in ("n_inside_unit_circle", "n_on_unit_circle", "n_outside_unit_circle",
                                "n_near_plus_one", "n_near_minus_one")}  # fmt: skip
    assert counts == {"n_inside_unit_circle": 1, "n_on_unit_circle": 4, "n_outside_unit_circle": 1,
                      "n_near_plus_one": 1, "n_near_minus_one": 1}  # fmt: skip
    assert e["spectral_radius"] == pytest.approx(1.5) and e["max_abs_imag"] == pytest.approx(1.05)
    assert e["tolerance"] == 0.1 and len(e["eigenvalues"]) == 6
    assert sorted(np.round(e["eigenvalues"], 12).tolist(), key=lambda z: (z.real, z.imag)) == pytest.approx(
        [-1.0, -1.05j, 1.05j, 0.5, 1.0, 1.5]
    )


def test_eigen_summary_bands_partition_the_spectrum_at_their_exact_edges():
    # tol 0.25 (exact in binary): 0.75 and 1.25 sit exactly on the band edges and count as on the circle;
    # 0.7499.. is inside, 1.2501 outside. inside + on + outside = dimension.
    op = np.diag([0.75, 1.25, 0.7499, 1.2501, -1.25, 0.0])
    e = of.eigen_summary(op, tol=0.25)
    assert (e["n_inside_unit_circle"], e["n_on_unit_circle"], e["n_outside_unit_circle"]) == (2, 3, 1)
    assert e["n_inside_unit_circle"] + e["n_on_unit_circle"] + e["n_outside_unit_circle"] == 6
    # near ±1 is strict: 1.25 and -1.25 are exactly tol away and are not near ±1
    assert (e["n_near_plus_one"], e["n_near_minus_one"]) == (0, 0)
    assert e["spectral_radius"] == 1.2501
    # default tol is 0.1: 0.95 is on the circle and near +1
    e = of.eigen_summary(np.diag([0.95, 0.85]))
    assert e["tolerance"] == 0.1
    assert (e["n_on_unit_circle"], e["n_near_plus_one"], e["n_inside_unit_circle"]) == (1, 1, 1)


def test_eigen_summary_spectral_radius_is_the_largest_modulus_even_when_negative_or_complex():
    assert of.eigen_summary(np.diag([0.2, -3.0]))["spectral_radius"] == pytest.approx(3.0)
    assert of.eigen_summary(2.0 * _rotation_2d(45))["spectral_radius"] == pytest.approx(2.0)


def test_eigen_summary_bands_use_the_modulus_for_negative_and_complex_eigenvalues():
    # -1.5 and ±1.5i lie outside the circle although their real parts are <= 1; -0.5 and ±0.5i lie inside
    e = of.eigen_summary(np.diag([-1.5, -0.5]), tol=0.1)
    assert (e["n_inside_unit_circle"], e["n_on_unit_circle"], e["n_outside_unit_circle"]) == (1, 0, 1)
    e = of.eigen_summary(1.5 * _rotation_2d(90), tol=0.1)
    assert (e["n_inside_unit_circle"], e["n_on_unit_circle"], e["n_outside_unit_circle"]) == (0, 0, 2)
    e = of.eigen_summary(0.5 * _rotation_2d(90), tol=0.1)
    assert (e["n_inside_unit_circle"], e["n_on_unit_circle"], e["n_outside_unit_circle"]) == (2, 0, 0)
    # -1 and ±i sit on the circle; only -1 is near -1
    e = of.eigen_summary(scipy.linalg.block_diag(-1.0, _rotation_2d(90)), tol=0.1)
    assert (e["n_on_unit_circle"], e["n_near_plus_one"], e["n_near_minus_one"]) == (3, 0, 1)


def test_prediction_holds_for_an_involution_and_fails_for_a_non_involution():
    q = np.linalg.qr(np.random.default_rng(70).normal(size=(4, 4)))[0]
    involution = q @ np.diag([1.0, -1.0, -1.0, 1.0]) @ q.T + 0.01 * np.eye(4)  # eigenvalues 1.01, -0.99
    assert of.prediction_holds("involution", of.eigen_summary(involution, tol=0.1))
    assert not of.prediction_holds("involution", of.eigen_summary(np.diag([1.0, -1.0, 0.5]), tol=0.1))
    # a rotation by 90 degrees is orthogonal but not an involution: eigenvalues ±i
    assert not of.prediction_holds("involution", of.eigen_summary(_rotation_2d(90), tol=0.1))
    assert not of.prediction_holds("involution", of.eigen_summary(_hand_spectrum_operator(), tol=0.1))


def test_prediction_holds_for_a_contraction_and_fails_when_an_eigenvalue_leaves_the_band():
    assert of.prediction_holds("contraction", of.eigen_summary(np.diag([0.2, 0.9, 1.0, 1.05]), tol=0.1))
    assert not of.prediction_holds("contraction", of.eigen_summary(np.diag([0.2, 1.2]), tol=0.1))
    rotation = np.array([[0.0, -1.0], [1.0, 0.0]])  # |λ| = 1 at ±i: orthogonal, no contraction
    assert not of.prediction_holds("contraction", of.eigen_summary(rotation, tol=0.1))
    assert not of.prediction_holds("contraction", of.eigen_summary(_hand_spectrum_operator(), tol=0.1))
    assert set(of.PREDICTIONS) == {"involution", "contraction"}
    with pytest.raises(ValueError, match="unknown prediction 'rotation'; known: involution, contraction"):
        of.prediction_holds("rotation", of.eigen_summary(np.eye(2)))


def test_involution_error_is_the_frobenius_norm_of_a_squared_minus_identity():
    assert of.involution_error(np.diag([1.0, -1.0])) == 0.0
    # diag(2, 1): A² − I = diag(3, 0) -> 3; R(90°)² = −I: A² − I = −2 I -> 2 sqrt(2)
    assert of.involution_error(np.diag([2.0, 1.0])) == pytest.approx(3.0)
    assert of.involution_error(_rotation_2d(90)) == pytest.approx(2 * np.sqrt(2))


# --------------------------------------------------------------------------------------------------------------
# Per-token L2 normalisation before the fits (pipeline/stages/operators.py)
# --------------------------------------------------------------------------------------------------------------


class _FakeStore:
    def __init__(self, features_nhwd: np.ndarray):
        self._features = features_nhwd
        self.layout = SimpleNamespace(hidden_dim=features_nhwd.shape[-1])

    def features(self, rows):
        return self._features[rows].astype(np.float32)  # a fresh array, as the real store returns


def test_normalized_tokens_are_unit_rows_in_image_then_grid_order():
    feats = np.zeros((2, 1, 2, 2), np.float32)
    feats[0, 0, 0] = [3.0, 4.0]  # norm 5 -> (0.6, 0.8)
    feats[0, 0, 1] = [0.0, -2.0]  # -> (0, -1)
    feats[1, 0, 0] = [1.0, 1.0]  # -> (1, 1)/sqrt(2)
    feats[1, 0, 1] = [0.0, 0.0]  # zero token stays zero (no division by zero)
    flat = _normalized_tokens(_FakeStore(feats), np.array([0, 1]))
    r = 1 / np.sqrt(2)
    assert flat.shape == (4, 2)
    assert np.allclose(flat, [[0.6, 0.8], [0.0, -1.0], [r, r], [0.0, 0.0]], atol=1e-7)
    assert np.allclose(_normalized_tokens(_FakeStore(feats), np.array([1])), [[r, r], [0.0, 0.0]], atol=1e-7)


def test_tokens_scaled_by_different_positive_factors_give_the_same_pair_stats():
    rng = np.random.default_rng(71)
    source = rng.normal(size=(3, 2, 2, 5)).astype(np.float32)
    target = rng.normal(size=(3, 2, 2, 5)).astype(np.float32)
    scale_s = rng.uniform(0.1, 50.0, size=(3, 2, 2, 1)).astype(np.float32)
    scale_t = rng.uniform(0.1, 50.0, size=(3, 2, 2, 1)).astype(np.float32)
    rows = np.arange(3)

    def stats_of(src, tgt):
        return of.PairStats.of(
            _normalized_tokens(_FakeStore(src), rows), _normalized_tokens(_FakeStore(tgt), rows)
        )

    plain, scaled = stats_of(source, target), stats_of(source * scale_s, target * scale_t)
    assert np.allclose(plain.cross_ba, scaled.cross_ba, atol=1e-5)
    assert np.allclose(plain.gram_aa, scaled.gram_aa, atol=1e-5)
    # unit targets: Σ‖b‖² is the number of tokens, 3 images x 2 x 2
    assert scaled.n_pairs == 12 and scaled.sum_sq_b == pytest.approx(12.0, rel=1e-6)


def test_a_nan_score_is_refused_by_the_tests_and_the_ranking_not_read_as_significant():
    # NaN compared as "no difference" in the permutation and bootstrap nulls: p came out 0.0 and 1/(n_boot + 1)
    x, y = pd.Series([1.0, 2.0, np.nan, 4.0, 5.0]), pd.Series([0.0, 1.0, 2.0, 3.0, 3.0])
    with pytest.raises(ValueError, match="a vs b: 1 of 10 values are not finite"):
        stats.compare("a", x, "b", y, n_boot=200, seed=0)
    with pytest.raises(ValueError, match="Holm's p-values: 1 of 3"):
        stats.holm([0.01, np.nan, 0.02])
    with pytest.raises(ValueError, match="scores of a: 1 of 5"):
        stats.ranking({"a": x, "b": y}, [], n_boot=200, seed=0, alpha=0.05)


def test_encoders_with_equal_means_share_a_rank():
    # means 2, 2, 2 and 1: competition ranking 1, 1, 1, 4 (they were ranked 1, 2, 3 in sort order)
    scores = {"x": pd.Series([1.0, 2.0, 3.0]), "y": pd.Series([3.0, 2.0, 1.0]), "z": pd.Series([2.0, 2.0, 2.0]),
              "w": pd.Series([1.0, 1.0, 1.0])}  # fmt: skip
    table = stats.ranking(scores, [], n_boot=200, seed=0, alpha=0.05)
    assert table["rank"].tolist() == [1, 1, 1, 4] and table["encoder"].tolist() == ["x", "y", "z", "w"]
