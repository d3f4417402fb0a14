"""Evaluate stage end to end: two tiny encoders that differ only in resolution, scored, compared and reported."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from pipeline.config import EvaluateConfig, StoreOptions, SubsetSpec, TrainConfig
from pipeline.config_files import REPO_CONFIG_DIR, resolve_encoder
from pipeline.models.checkpoints import read_header
from pipeline.stages import encode, evaluate, train


@pytest.fixture(scope="module")
def targets(tmp_path_factory, demo_dataset):
    """tiny-vit-64 and tiny-vit-112 (same random weights, other resolution), each with a 2-epoch reconstructor."""
    from pipeline.config import EncodeOptions, TransformSpec
    from pipeline.config_files import resolve_encoder

    root = tmp_path_factory.mktemp("eval")
    out = []
    for name in ("tiny-vit-64", "tiny-vit-112"):

        def job(split, subset=SubsetSpec(), name=name):
            return encode.EncodeJob(root / "stores", demo_dataset, split, subset, resolve_encoder(name), TransformSpec(),
                                    StoreOptions(shard_images=8), EncodeOptions(batch_size=8, num_workers=0))  # fmt: skip

        train_store = encode.run(job("train", SubsetSpec(max_images=16)), progress=False).store_path
        val_store = encode.run(job("val"), progress=False).store_path
        cfg = TrainConfig(output_root=root / "train", epochs=2, batch_size=8, n_val_images=4, n_sample_images=2,
                          shuffle_buffer_images=8)  # fmt: skip
        checkpoint = train.run(train.TrainJob(train_store, val_store, cfg), progress=False).checkpoint
        out.append(evaluate.EvalTarget(name, val_store, checkpoint))
    return out


@pytest.fixture(scope="module")
def result(targets, tmp_path_factory):
    cfg = EvaluateConfig(output_root=tmp_path_factory.mktemp("evaluate"), judges=["tiny-judge"], n_boot=500,
                         n_grid_images=3, device="cpu")  # fmt: skip
    return evaluate.run(targets, cfg, evaluate.load_judges([resolve_encoder("tiny-judge")], "cpu")), cfg


def test_scores_are_stored_per_image_in_long_format(result, targets):
    res, cfg = result
    scores = pd.concat(pd.read_parquet(f) for f in res.score_files)
    assert list(scores.columns) == ["image_id", "encoder", "judge", "metric", "value"]
    n_val = 12
    for name in ("tiny-vit-64", "tiny-vit-112"):
        mine = scores[scores.encoder == name]
        assert set(mine.metric) >= {"psnr_db", "ssim", "mse", "cosine_grayscale", "cosine_color"}
        assert (mine.groupby(["judge", "metric"]).size() == n_val).all()
    cos = scores[scores.metric.str.startswith("cosine")]["value"]
    assert cos.between(-1, 1).all()


def test_report_exists_with_tables_and_embedded_figures(result):
    res, _ = result
    md, html = res.report_md.read_text(), res.report_html.read_text()
    for section in (
        "Setup: this run beside the paper and its released code",
        "Inputs",
        "Ranking by tiny-judge / cosine_grayscale",
        "Paired comparisons",
        "Reconstructions",
    ):
        assert section in md and section in html
    for fig in ("ranking.png", "distributions.png", "differences.png", "reconstructions.png"):
        assert (res.report_md.parent / fig).stat().st_size > 1000
        assert f"]({fig})" in md
    assert html.count("data:image/png;base64,") == 4
    assert "store_hash" in md and "checkpoint_config_hash" in md
    setup = md[md.index("## Setup") : md.index("## Inputs")]
    for row in ("| feature layer ", "hidden_states[-2]", "| image geometry ", "short_side_crop", "| LR schedule ",
                "| checkpoint used  ", "| alternative ", "two-sided", "released architecture",
                "encode float32, train float32, judges float32", "to 224 px, truncated to uint8"):  # fmt: skip
        assert row in setup, row
    assert "| alternative " in md[md.index("## Paired comparisons") :] and "permutation_p" in md


def _scores(means: dict[str, float], n: int, seed: int) -> pd.DataFrame:
    """Long-format judge scores: n images per encoder around the given means (sd 0.05)."""
    rng = np.random.default_rng(seed)
    return pd.concat(
        [pd.DataFrame({"image_id": np.arange(n), "encoder": name, "judge": "j", "metric": "cosine_grayscale",
                       "value": mean + rng.normal(0, 0.05, n)}) for name, mean in means.items()],
        ignore_index=True,
    )  # fmt: skip


def test_a_directional_comparison_is_tested_one_sided_in_every_test():
    scores = _scores({"a": 0.805, "b": 0.8, "c": 0.8}, n=40, seed=1)
    two = evaluate.analyse(scores, EvaluateConfig(judges=["j"], judge_modes=["grayscale"], n_boot=2000,
                                                  comparisons=[("a", "b")]))  # fmt: skip
    one = evaluate.analyse(scores, EvaluateConfig(judges=["j"], judge_modes=["grayscale"], n_boot=2000,
                                                  comparisons=[{"a": "a", "b": "b", "alternative": "greater"}]))  # fmt: skip
    [t], [g] = two["comparisons"][("j", "cosine_grayscale")], one["comparisons"][("j", "cosine_grayscale")]
    assert (t.alternative, g.alternative) == ("two-sided", "greater")
    # With the observed difference in the hypothesised direction, each one-sided p is about half the two-sided.
    for test in ("wilcoxon_p", "permutation_p", "bootstrap_p"):
        assert getattr(g, test) == pytest.approx(getattr(t, test) / 2, rel=0.25), test
    with pytest.raises(ValueError, match=r"\['zz'\] that are not evaluated"):
        evaluate.analyse(scores, EvaluateConfig(judges=["j"], n_boot=500, comparisons=[("a", "zz")]))


def test_report_numbers_match_the_per_image_parquet(result):
    res, cfg = result
    scores = pd.concat(pd.read_parquet(f) for f in res.score_files)
    primary = scores[(scores.judge == "tiny-judge") & (scores.metric == "cosine_grayscale")]
    ranking = pd.read_csv(res.report_md.parent / "ranking__tiny-judge__cosine_grayscale.csv")
    for _, row in ranking.iterrows():
        assert row["mean"] == pytest.approx(primary[primary.encoder == row["encoder"]]["value"].mean())
        assert re.search(rf"\| +{row['rank']} \| {row['encoder']} ", res.report_md.read_text())
    comparisons = pd.read_csv(res.report_md.parent / "comparisons.csv")
    psnr = comparisons[(comparisons.judge == "pixels") & (comparisons.metric == "psnr_db")].iloc[0]
    per = scores[scores.metric == "psnr_db"].pivot(index="image_id", columns="encoder", values="value")
    assert psnr["mean_diff"] == pytest.approx((per[psnr["a"]] - per[psnr["b"]]).mean())
    from scipy.stats import wilcoxon

    assert psnr["wilcoxon_p"] == pytest.approx(wilcoxon(per[psnr["a"]], per[psnr["b"]]).pvalue)


def test_scores_are_reused_not_recomputed(result, targets):
    res, cfg = result
    stamps = [f.stat().st_mtime_ns for f in res.score_files]
    report_stamp = res.report_md.stat().st_mtime_ns
    again = evaluate.run(targets, cfg, evaluate.load_judges([resolve_encoder("tiny-judge")], "cpu"))
    assert [f.stat().st_mtime_ns for f in again.score_files] == stamps
    # The report is an artifact too: same scores and statistics settings, nothing recomputed or rewritten.
    assert again.report_md == res.report_md and again.report_md.stat().st_mtime_ns == report_stamp
    assert again.already_complete and not res.already_complete  # the command says it was read, not made
    assert again.analysis["primary"] == res.analysis["primary"]
    for key, ranking in res.analysis["rankings"].items():
        pd.testing.assert_frame_equal(again.analysis["rankings"][key], ranking, check_dtype=False)
    first = {k: [c.to_dict() for c in v] for k, v in res.analysis["comparisons"].items()}
    second = {k: [c.to_dict() for c in v] for k, v in again.analysis["comparisons"].items()}
    assert first.keys() == second.keys() and all(
        pd.DataFrame(first[k]).equals(pd.DataFrame(second[k])) or
        np.allclose(pd.DataFrame(first[k]).select_dtypes("number"), pd.DataFrame(second[k]).select_dtypes("number"),
                    equal_nan=True)
        for k in first
    )  # fmt: skip
    res.report_html.unlink()  # a report missing a file is written again, not reused
    rebuilt = evaluate.run(targets, cfg, evaluate.load_judges([resolve_encoder("tiny-judge")], "cpu"))
    assert rebuilt.report_html.is_file() and [f.stat().st_mtime_ns for f in rebuilt.score_files] == stamps
    assert not rebuilt.already_complete


def test_headline_pairs_pick_siglip_vs_siglip2_at_the_same_resolution():
    names = ["siglip-b16-224", "siglip2-b16-224", "siglip-b16-384", "clip-b16-openai", "siglip2-b16-512"]
    assert evaluate.headline_pairs(names) == [("siglip-b16-224", "siglip2-b16-224")]


def test_a_judge_without_its_head_is_refused():
    with pytest.raises(ValueError, match="keep_head"):
        evaluate.load_judges([resolve_encoder("tiny-vit-64")], "cpu")


def test_lpips_is_skipped_with_a_note_when_unavailable():
    model, note = evaluate._lpips_model()
    assert model is not None or "LPIPS skipped" in note


def test_the_headline_table_is_built_whatever_the_order_of_a_requested_pair():
    scores = _scores({"siglip-b16-224": 0.8, "siglip2-b16-224": 0.85}, n=30, seed=0)
    cfg = EvaluateConfig(judges=["j"], judge_modes=["grayscale"], n_boot=200,
                         comparisons=[("siglip2-b16-224", "siglip-b16-224")])  # fmt: skip
    analysis = evaluate.analyse(scores, cfg)
    assert len(analysis["headline"]) == 1 and analysis["primary"] == ("j", "cosine_grayscale")


def test_runtime_fields_reuse_scores_and_report_statistics_fields_only_the_report(result, targets, tmp_path):
    res, cfg = result
    judges = evaluate.load_judges([resolve_encoder("tiny-judge")], "cpu")
    runtime = cfg.model_copy(update={"batch_size": 5, "n_grid_images": 2, "encoders": ["tiny-vit-64"]})
    same = evaluate.run(targets, runtime, judges, progress=False)
    assert same.score_files == res.score_files and same.report_md == res.report_md
    stamps = [f.stat().st_mtime_ns for f in res.score_files]
    new_stats = evaluate.run(targets, cfg.model_copy(update={"n_boot": 200}), judges, progress=False)
    assert (
        new_stats.score_files == res.score_files and [f.stat().st_mtime_ns for f in res.score_files] == stamps
    )
    assert new_stats.report_md != res.report_md
    rescored = evaluate.run(targets, cfg.model_copy(update={"pixel_resolution": 32}), judges, progress=False)
    assert not set(rescored.score_files) & set(res.score_files)
    native = evaluate.run(
        targets, cfg.model_copy(update={"judge_input_resolution": None}), judges, progress=False
    )
    assert not set(native.score_files) & set(res.score_files)
    cosine = [pd.read_parquet(f).query("metric == 'cosine_grayscale'").value.to_numpy() for f in
              (res.score_files[0], native.score_files[0])]  # fmt: skip
    assert not np.allclose(*cosine)  # the judge saw other pixels


def test_the_judges_order_picks_the_ranking_the_report_leads_with_and_a_judge_path_is_its_name(
    result, targets, tmp_path
):
    import yaml

    from storage import open_store

    res, cfg = result
    spec = yaml.safe_load((REPO_CONFIG_DIR / "encoders" / "tiny-judge.yaml").read_text())
    other = tmp_path / "tiny-judge-2.yaml"
    other.write_text(yaml.safe_dump({**spec, "name": "tiny-judge-2", "seed": 2}))
    specs = {"tiny-judge": resolve_encoder("tiny-judge"), str(other): resolve_encoder(str(other))}
    reports = {}
    for order in (["tiny-judge", str(other)], [str(other), "tiny-judge"]):
        two = cfg.model_copy(update={"judges": order, "n_boot": 200})
        judges = evaluate.load_judges([specs[j] for j in order], "cpu")
        reports[order[0]] = evaluate.run(targets, two, judges, progress=False)
        assert reports[order[0]].analysis["primary"] == (two.judge_names()[0], "cosine_grayscale")
        header = read_header(targets[0].checkpoint)  # what `plan` finds, naming the judge by its file
        found = evaluate.scores_found(targets[0].encoder_name, open_store(targets[0].store), header, two)
        assert found in reports[order[0]].score_files
    first, second = reports.values()
    assert first.score_files == second.score_files  # every judge's scores, whichever leads
    assert first.report_md != second.report_md  # a cached report led by the other judge was returned
    assert "Ranking by tiny-judge-2 / cosine_grayscale" in second.report_md.read_text()


def test_encoders_scored_on_different_images_are_ranked_on_the_common_ones():
    rng = np.random.default_rng(0)
    rows = [{"image_id": i, "encoder": "a", "judge": "pixels", "metric": "psnr_db", "value": 20 + rng.normal()}
            for i in range(10)]  # fmt: skip
    rows += [
        {"image_id": i, "encoder": "b", "judge": "pixels", "metric": "psnr_db", "value": 10.0}
        for i in range(8)
    ]
    rows += [{"image_id": 99, "encoder": "a", "judge": "pixels", "metric": "psnr_db", "value": -1000.0}]
    cfg = EvaluateConfig(judges=[], n_boot=200, n_permutations=200)
    analysis = evaluate.analyse(pd.DataFrame(rows), cfg)
    ranking = analysis["rankings"][("pixels", "psnr_db")]
    assert ranking["n_images"].tolist() == [8, 8]
    assert (
        ranking.iloc[0]["encoder"] == "a" and 19 < ranking.iloc[0]["mean"] < 21
    )  # not dragged down by id 99
    assert "a 11, b 8" in analysis["notes"][0] and "use the 8 images" in analysis["notes"][0]
    disjoint = pd.DataFrame(
        [{**r, "image_id": r["image_id"] + 1000} if r["encoder"] == "b" else r for r in rows]
    )
    with pytest.raises(ValueError, match="no image was scored for every encoder"):
        evaluate.analyse(disjoint, cfg)


def test_an_image_with_a_nan_score_is_left_out_for_every_encoder_and_said_so():
    rows = [{"image_id": i, "encoder": e, "judge": "pixels", "metric": m, "value": v + i}
            for i in range(6) for e, v in (("a", 20.0), ("b", 10.0)) for m in ("psnr_db", "ssim")]  # fmt: skip
    rows[0]["value"] = np.nan  # image 0, encoder a, psnr_db: its ssim and encoder b's scores are finite
    analysis = evaluate.analyse(pd.DataFrame(rows), EvaluateConfig(judges=[], n_boot=200, n_permutations=200))
    for metric in ("psnr_db", "ssim"):
        ranking = analysis["rankings"][("pixels", metric)].set_index("encoder")
        assert ranking["n_images"].tolist() == [5, 5] and ranking.loc["a", "mean"] == pytest.approx(23.0)
    assert "a 5, b 6; a NaN or inf score counts as unscored" in analysis["notes"][0]
