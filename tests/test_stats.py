"""Statistics against known answers: scipy's Wilcoxon, bootstrap coverage, power and size, Holm, pairing by id."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from pipeline.science import stats


def _series(values, ids=None) -> pd.Series:
    return pd.Series(
        values, index=pd.Index(ids if ids is not None else np.arange(len(values)), name="image_id")
    )


def test_wilcoxon_p_values_equal_scipy_on_the_same_pairs():
    rng = np.random.default_rng(0)
    a = rng.normal(0.6, 0.1, 80)
    b = a - 0.01 + rng.normal(0, 0.03, 80)
    result = stats.compare("a", _series(a), "b", _series(b), n_boot=500, seed=0)
    expected = sps.wilcoxon(a, b)
    assert result.wilcoxon_p == pytest.approx(expected.pvalue, rel=1e-12)
    assert result.wilcoxon_statistic == expected.statistic


def test_bootstrap_ci_covers_the_true_mean_difference_at_about_its_nominal_rate():
    rng = np.random.default_rng(1)
    true_diff, hits, n_sims = 0.02, 0, 200
    for sim in range(n_sims):
        d = true_diff + rng.standard_t(df=5, size=60) * 0.05
        low, high, _, _ = stats.bootstrap_mean_diff(d, n_boot=1000, seed=sim)
        hits += low <= true_diff <= high
    # Nominal 95%; bootstrap intervals run a little narrow at n=60. Binomial sd at 200 sims is ~1.5%.
    assert 0.88 <= hits / n_sims <= 0.99


@pytest.mark.parametrize("seed", range(5))
def test_a_planted_shift_is_detected_by_both_tests(seed):
    rng = np.random.default_rng(100 + seed)
    a = rng.normal(0.5, 0.1, 100)
    b = a - 0.03 + rng.normal(0, 0.04, 100)
    result = stats.compare("a", _series(a), "b", _series(b), n_boot=2000, seed=seed)
    assert result.wilcoxon_p < 0.05 and result.bootstrap_p < 0.05 and result.diff_ci_low > 0
    assert result.rank_biserial > 0.3


def test_a_zero_shift_is_rejected_at_about_alpha_over_seeds():
    rng = np.random.default_rng(7)
    rejections_w, rejections_b, n_sims = 0, 0, 100
    for sim in range(n_sims):
        a = rng.normal(0.5, 0.1, 50)
        b = a + rng.normal(0, 0.04, 50)
        r = stats.compare("a", _series(a), "b", _series(b), n_boot=500, seed=sim)
        rejections_w += r.wilcoxon_p < 0.05
        rejections_b += r.bootstrap_p < 0.05
    assert rejections_w / n_sims <= 0.12 and rejections_b / n_sims <= 0.12


def test_holm_matches_a_hand_computed_case():
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> monotone 0.06; back in input order
    assert np.allclose(stats.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    assert np.allclose(stats.holm([0.5, 0.9]), [1.0, 1.0])  # 0.5*2 = 1.0, then monotone


def test_pairs_are_matched_by_image_id_and_unmatched_images_are_counted():
    a = _series([0.1, 0.2, 0.3, 0.4, 0.5], ids=[1, 2, 3, 4, 5])
    b = _series([0.5, 0.3, 0.2, 0.0], ids=[5, 3, 2, 9])  # other order, id 1 and 4 missing, 9 extra
    x, y, only_a, only_b = stats.match_by_id(a, b)
    assert list(x) == [0.2, 0.3, 0.5] and list(y) == [0.2, 0.3, 0.5]
    assert (only_a, only_b) == (2, 1)
    result = stats.compare("a", a, "b", b, n_boot=200, seed=0)
    assert (result.n_pairs, result.n_only_a, result.n_only_b) == (3, 2, 1)


def test_rank_biserial_is_plus_one_when_every_difference_is_positive():
    assert stats.rank_biserial(np.array([0.1, 0.2, 0.05])) == 1.0
    assert stats.rank_biserial(np.array([-0.1, -0.2])) == -1.0


def test_ranking_orders_by_mean_and_lists_ties():
    rng = np.random.default_rng(3)
    base = rng.normal(0.5, 0.1, 80)
    scores = {
        "good": _series(base + 0.05),
        "same": _series(base + 0.05 + rng.normal(0, 0.001, 80)),
        "bad": _series(base),
    }
    family = stats.compare_family(
        scores,
        [(a, b, "two-sided") for a, b in [("good", "same"), ("good", "bad"), ("same", "bad")]],
        n_boot=500,
        seed=0,
    )
    table = stats.ranking(scores, family, n_boot=500, seed=0, alpha=0.05)
    assert table["encoder"].iloc[-1] == "bad"
    assert "same" in table.set_index("encoder").loc["good", "not_significantly_different_from"]
    assert table.set_index("encoder").loc["bad", "not_significantly_different_from"] == "-"
    assert (table["ci_low"] <= table["mean"]).all() and (table["mean"] <= table["ci_high"]).all()


def test_thousands_of_images_use_the_monte_carlo_permutation_test_without_overflow():
    rng = np.random.default_rng(4)
    a = rng.normal(0.8, 0.05, 5000)
    b = a - 0.002 + rng.normal(0, 0.02, 5000)
    r = stats.compare("a", _series(a), "b", _series(b), n_boot=500, seed=0, n_permutations=500)
    # No flip reaches the observed mean: scipy reports twice the smallest one-sided p, 2 / (500 + 1).
    assert not r.permutation_exact and r.permutation_p == pytest.approx(2 / 501) and r.ci_method == "BCa"
