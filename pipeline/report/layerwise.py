"""Informativeness vs depth, for encoders read at several layers of one network: each layer's mean score and
adjacent layers' paired tests, from the evaluate stage's per-image scores and rankings."""

from __future__ import annotations

import pandas as pd

from pipeline.config import EvaluateConfig
from pipeline.science import stats


def layerwise(scores: pd.DataFrame, groups: dict[str, list[tuple[str, int]]], rankings: dict,
              cfg: EvaluateConfig) -> tuple[pd.DataFrame, pd.DataFrame]:  # fmt: skip
    """Informativeness vs depth: each layer's mean score with its bootstrap CI (from the ranking, so on the common
    images), and two-sided paired tests between adjacent layers, Holm-corrected within each network and score."""
    means, tests = [], []
    for label, members in groups.items():
        depth = dict(members)
        for (judge, metric), ranking in rankings.items():
            rows = ranking.set_index("encoder").loc[list(depth)]
            means += [{"network": label, "encoder": name, "depth": depth[name], "judge": judge, "metric": metric,
                       **rows.loc[name, ["n_images", "mean", "ci_low", "ci_high"]].to_dict()} for name in depth]  # fmt: skip
            subset = scores[(scores.judge == judge) & (scores.metric == metric)]
            per_layer = {n: subset[subset.encoder == n].set_index("image_id")["value"] for n in depth}
            pairs = [(a, b, "two-sided") for (a, _), (b, _) in zip(members, members[1:], strict=False)]
            for c in stats.compare_family(per_layer, pairs, cfg.n_boot, cfg.seed, cfg.n_permutations):
                tests.append({"network": label, "judge": judge, "metric": metric, "depth_a": depth[c.a],
                              "depth_b": depth[c.b], **c.to_dict()})  # fmt: skip
    return pd.DataFrame(means), pd.DataFrame(tests)
