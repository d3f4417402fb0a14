"""The token utility stage: the masks' mechanics, known answers on planted stores (exact-copy token pairs), the
keep-fraction floor, resume after SIGKILL, and the stage end to end through the plan on the tiny encoder."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import TokensConfig
from pipeline.models import token_training as tt
from pipeline.models.token_selector import (
    TokenUtilityModel,
    completed_set,
    n_kept,
    norm_mask,
    random_mask,
    straight_through_mask,
    top_k_mask,
)
from storage import open_store
from storage.creation import create
from storage.layout import StoreLayout

ROOT = Path(__file__).resolve().parent.parent


def pair_store(path: Path, n: int, seed: int, scale: float = 1.0):
    """16 tokens of 16 dims per image in exact-copy pairs: token i (i < 8) equals token i + 8."""
    from storage.precision import value_stats

    rng = np.random.default_rng(seed)
    half = (scale * rng.normal(size=(n, 8, 16))).astype(np.float32)
    feats = np.concatenate([half, half], axis=1).reshape(n, 4, 4, 16)
    layout = StoreLayout(n, (4, 4), 16, 8, 64, "float32", "blosc_zstd_shuffle")
    enc = {"name": "pairs", "backend": "none", "model_id": "pairs", "weights_id": "planted", "feature_layer": "last",
           "grid_hw": [4, 4], "hidden_dim": 16, "preprocessing": {"mean": [0.5] * 3, "std": [0.5] * 3}}  # fmt: skip
    store = create(path, layout, {"config_hash": path.name, "encoder": enc})
    for shard in range(layout.n_shards):
        rows = layout.shard_slice(shard)
        m = rows.stop - rows.start
        store.write_shard(shard, feats[rows], np.zeros((m, 8, 8, 3), np.uint8), seed * 100_000 + np.arange(n)[rows],
                          np.ones(m, bool), {"n_encoded": m, "failures": [], "stats": value_stats(feats[rows])})  # fmt: skip
    store.finalize()
    return open_store(path)


SMALL = {"network": {"width": 32, "depth": 2, "head_dim": 16}, "batch_size": 32, "lr": 2e-3}


def train(store, spec, cfg, out: Path) -> Path:
    moments = tt.feature_moments(store)
    return tt.train_network(store, spec, cfg, out, moments, {"config_hash": "test"}, torch.device("cpu"),
                            torch.float32)  # fmt: skip


def test_the_straight_through_mask_is_exactly_binary_and_passes_gradients_to_the_logits():
    torch.manual_seed(0)
    logits = torch.randn(4, 50, requires_grad=True)
    mask = straight_through_mask(logits, tau=1.0)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    (mask * torch.arange(50.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # P(keep) = sigmoid(logit): strongly positive logits are (almost) always kept, negative ones dropped
    big = torch.tensor([[8.0, -8.0]]).repeat(2000, 1)
    kept = straight_through_mask(big, tau=1.0).mean(dim=0)
    assert kept[0] > 0.99 and kept[1] < 0.01


def test_top_k_random_and_norm_masks_keep_exactly_k():
    tokens = torch.randn(3, 20, 8)
    for k in (1, 7, 20):
        for mask in (top_k_mask(torch.randn(3, 20), k), random_mask(3, 20, k, torch.Generator().manual_seed(1)),
                     norm_mask(tokens, k)):  # fmt: skip
            assert mask.shape == (3, 20) and (mask.sum(dim=1) == k).all()
    norms = tokens.norm(dim=-1)
    kept = norm_mask(tokens, 5).bool()
    assert (norms[kept].view(3, 5).min(dim=1).values >= norms[~kept].view(3, 15).max(dim=1).values).all()
    assert n_kept(0.5, 16) == 8 and n_kept(0.01, 16) == 1 and n_kept(1.0, 16) == 16


def test_keeping_every_token_returns_the_originals_exactly():
    model = TokenUtilityModel(16, 16, 32, 1, 2, with_selector=True)
    tokens = torch.randn(2, 16, 16)
    keep = torch.ones(2, 16)
    assert torch.equal(completed_set(tokens, model.complete(tokens, keep), keep), tokens)


def test_on_exact_copy_pairs_the_selector_keeps_one_of_each_pair_and_beats_random(tmp_path):
    train_store = pair_store(tmp_path / "train.zarr", 512, 1)
    held_out = pair_store(tmp_path / "val.zarr", 64, 2)
    cfg = TokensConfig(fractions=[0.5], epochs=25, **SMALL)
    tokens = torch.from_numpy(held_out.features()).flatten(1, 2)
    errors = {}
    for method in ("learned", "random"):
        model, _ = tt.load(train(train_store, tt.NetworkSpec(method, 0.5), cfg, tmp_path / method))
        with torch.no_grad():
            if method == "learned":
                keep = top_k_mask(model.keep_logits(tokens), 8)
                both_dropped = ((keep[:, :8] + keep[:, 8:]) == 0).float().mean().item()
                assert both_dropped <= 0.02, f"{both_dropped:.1%} of pairs lost both copies"
            else:
                keep = random_mask(len(tokens), 16, 8, torch.Generator().manual_seed(0))
            completed = completed_set(tokens, model.complete(tokens, keep), keep)
        errors[method] = ((completed - tokens) ** 2).mean().item() / tokens.var().item()
    assert errors["learned"] < 0.05, errors
    assert errors["random"] > 4 * errors["learned"] and errors["random"] > 0.1, errors


def test_without_the_floor_the_kept_fraction_collapses_and_with_it_settles_near_p(tmp_path):
    import pandas as pd

    store = pair_store(tmp_path / "train.zarr", 256, 3, scale=0.2)
    kept = {}
    for p in (0.0, 0.5):
        cfg = TokensConfig(fractions=[0.5], epochs=15, **SMALL)
        out = train(store, tt.NetworkSpec("learned", p), cfg, tmp_path / f"p{p}")
        kept[p] = pd.read_csv(out.parent / "metrics.csv")["kept_fraction"].iloc[-3:].mean()
    assert kept[0.0] < 0.15, kept
    assert abs(kept[0.5] - 0.5) < 0.1, kept


RESUMABLE = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)  # the same reduction order as the runs it is compared with
    sys.path[:0] = [{root!r}, {tests!r}]
    from test_tokens import pair_store, train, SMALL
    from pipeline.config import TokensConfig
    from pipeline.models import token_training as tt
    from storage import open_store
    import os, signal
    from pipeline.models import resumable
    save_epoch = resumable.save_epoch
    def save_epoch_then_die(out_dir, model, optimizer, header, metrics):  # a tiny run ends between two polls
        save_epoch(out_dir, model, optimizer, header, metrics)
        if metrics["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGKILL)
    resumable.save_epoch = save_epoch_then_die
    cfg = TokensConfig(fractions=[0.5], epochs=6, seed=3, **SMALL)
    train(open_store({store!r}), tt.NetworkSpec("learned", 0.5), cfg, __import__("pathlib").Path({out!r}))
    """
)


def test_a_killed_training_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, one_thread):
    store = pair_store(tmp_path / "train.zarr", 128, 4)
    cfg = TokensConfig(fractions=[0.5], epochs=6, seed=3, **SMALL)
    whole = train(store, tt.NetworkSpec("learned", 0.5), cfg, tmp_path / "whole")
    killed = tmp_path / "killed"
    script = RESUMABLE.format(
        root=str(ROOT), tests=str(ROOT / "tests"), store=str(store.path), out=str(killed)
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], timeout=120
    )  # SIGKILLs itself after epoch 1's checkpoint
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    assert not (killed / "final.json").is_file(), "the run finished before it could be killed"
    assert [p.name for p in killed.glob("epoch-*.json")] == ["epoch-0001.json"]
    resumed = train(store, tt.NetworkSpec("learned", 0.5), cfg, killed)
    a, b = (
        load_file(str(whole.with_suffix(".safetensors"))),
        load_file(str(resumed.with_suffix(".safetensors"))),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tokens_run(study_root, demo_root, encode_and_train):
    """The stage through the plan on the tiny 64 px encoder: stores, its reconstructor, then the study."""
    from pipeline.stages import tokens

    tmp = study_root
    data = {"store_root": str(tmp / "stores"), "dataset": {"name": "demo", "kind": "demo", "root": str(demo_root)},
            "encoders": ["tiny-vit-64"], "store": {"shard_images": 16}, "encode": {"batch_size": 16, "num_workers": 0},
            "train": {"output_root": str(tmp / "train"), "epochs": 1, "batch_size": 8, "n_val_images": 4},
            "evaluate": {"judges": ["tiny-judge"]},
            "tokens": {"output_root": str(tmp / "tokens"), "fractions": [0.25, 1.0], "epochs": 2, "batch_size": 8,
                       "network": {"width": 32, "depth": 1, "head_dim": 16}, "n_boot": 200, "n_grid_images": 3}}  # fmt: skip
    config = tmp / "tokens.yaml"
    run, checkpoint = encode_and_train(data, config, "tokens")
    job = run.study_job(run.study_steps("tokens")[0], checkpoint)
    return config, job, tokens.run(job)


def test_the_stage_scores_every_method_and_fraction_and_writes_its_report(tokens_run):
    import pandas as pd

    _, job, result = tokens_run
    scores = pd.read_parquet(result.out_dir / "token_scores.parquet")
    completed = scores[scores.completion == "completed"]
    assert set(completed.method) == {"learned", "random", "norm"} and set(completed.fraction) == {0.25, 1.0}
    assert {"feature_cosine", "psnr_vs_full_db", "psnr_db", "ssim", "judge_cosine"} <= set(completed.metric)
    keep_all = completed[(completed.fraction == 1.0) & (completed.metric == "feature_mse")]
    assert (keep_all.value == 0).all(), "keep 1.0 must return the original tokens"
    assert scores.image_id.nunique() == 12  # every held-out image of the demo fixture
    report = result.report.read_text()
    assert "Recorded choices" in report and "does not claim to reproduce" in report
    assert "Mean scores with no completion" in report  # they were only in means.csv and dotted lines
    assert (
        "32 / 2 (width // 16, at least 1)" in report
        and "width set in the config; heads: reconlab's" in report
    )
    from pipeline.report.tokens_report import choices_table

    row = choices_table(TokensConfig(), 192).set_index("setting").loc["width / heads"]  # not "width // 64"
    assert row.value == "192 / 3 (width // 64, at least 1)" and row.source.startswith("the encoder's width")
    judge = choices_table(TokensConfig(judge_input_resolution=None), 192).set_index("setting").loc["judge"]
    assert (
        judge.value.startswith("grayscale copies at the encoder's resolution") and "reconlab" in judge.source
    )
    for name in ("curves.png", "grid.png", "tests.csv", "means.csv", "report.html"):
        assert (result.out_dir / name).is_file(), name
    tests = pd.read_csv(result.out_dir / "tests.csv")
    assert set(tests.baseline) == {"random", "norm"} and (tests.holm_p_wilcoxon >= tests.wilcoxon_p).all()


def test_a_finished_study_is_found_and_eval_settings_reuse_the_trained_networks(tokens_run):
    from dataclasses import replace

    from pipeline.stages import tokens

    _, job, first = tokens_run
    again = tokens.run(job)
    assert again.already_complete and again.out_dir == first.out_dir
    finals = {p: p.stat().st_mtime_ns for p in first.networks_dir.glob("*/final.json")}
    rescored = tokens.run(replace(job, cfg=job.cfg.model_copy(update={"n_boot": 300})))
    assert not rescored.already_complete and rescored.out_dir != first.out_dir
    assert rescored.networks_dir == first.networks_dir
    assert {p: p.stat().st_mtime_ns for p in first.networks_dir.glob("*/final.json")} == finals


def test_the_plan_lists_the_study_and_refuses_what_cannot_work(tokens_run, tmp_path):
    import yaml

    from pipeline import checks, plan, plan_table
    from pipeline.config import ConfigError
    from pipeline.config_files import load_run_config

    config, _, _ = tokens_run
    rows = [s for s in plan_table.plan(load_run_config(config), config) if s.stage == "tokens"]
    assert [r.state for r in rows] == ["cached", "cached"]
    finals = sorted(Path(rows[0].path).glob("*/final.json"))
    assert all(list(final.parent.glob("epoch-*.json")) for final in finals)  # each keeps its last epoch
    # as if killed in training: epoch checkpoints, no final
    hidden = [final.rename(final.with_name("final.json.hidden")) for final in finals]
    try:
        states = [s.state for s in plan_table.plan(load_run_config(config), config) if s.stage == "tokens"]
        assert states[0] == f"partial (0/{len(finals)} networks)", states
    finally:
        for final, moved in zip(finals, hidden, strict=True):
            moved.rename(final)
    data = yaml.safe_load(config.read_text())
    # as many networks as trained, not the same ones: the plan said cached (it counted the folder's networks)
    other = tmp_path / "other-fractions.yaml"
    other.write_text(yaml.safe_dump({**data, "tokens": {**data["tokens"], "fractions": [0.5, 1.0]}}))
    rows = [s for s in plan_table.plan(load_run_config(other), other) if s.stage == "tokens"]
    assert rows[0].state == f"partial ({len(finals) // 2}/{len(finals)} networks)", rows[0]
    data["tokens"] |= {"split": "train", "train_split": "val"}  # scored on the images that trained R
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="tokens.split 'train'"):
        checks.preflight(plan.build(load_run_config(bad), bad), ("encode", "train", "tokens"))
    del data["tokens"]
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="no tokens: section"):
        plan.build(load_run_config(bad), bad).study_steps("tokens")


def test_shared_mode_trains_one_network_per_method_and_a_baseline_draws_k_from_the_fractions(tmp_path):
    cfg = TokensConfig(selectors="shared", shared_fraction=0.5, fractions=[0.25, 0.75], epochs=1, **SMALL)
    specs = tt.network_specs(cfg)
    assert [s.name for s in specs] == ["learned-p0.5", "random-shared", "norm-shared"]
    out = train(pair_store(tmp_path / "train.zarr", 64, 5), specs[1], cfg, tmp_path / "random")
    model, header = tt.load(out)
    assert header["network"] == {"method": "random", "fraction": None, "name": "random-shared"}
    assert model.selector is None


@pytest.mark.parametrize(
    "tokens, field",
    [({"fractions": [0.5, 1.5]}, "tokens.fractions"), ({"split": "train"}, "tokens"),
     ({"keep_penalty": "none"}, "tokens.keep_penalty")],
)  # fmt: skip
def test_a_bad_tokens_section_fails_at_load_naming_the_field(write_run_config, tokens, field):
    import yaml

    from pipeline.config import ConfigError
    from pipeline.config_files import load_run_config

    path = write_run_config()
    path.write_text(yaml.safe_dump(yaml.safe_load(path.read_text()) | {"tokens": tokens}))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_run_config(path)


def test_the_cli_says_in_one_line_when_a_config_has_no_token_study(write_run_config):
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["tokens", "--config", str(write_run_config())])
    assert (
        result.exit_code == 2 and "no tokens: section" in result.output and "Traceback" not in result.output
    )


def test_fractions_that_keep_no_token_or_the_same_tokens_are_config_errors():
    from pipeline.config import ConfigError
    from pipeline.stages.tokens import check_fractions

    check_fractions(TokensConfig(fractions=[0.0625, 0.25, 1.0]), "enc", (4, 4))  # 1, 4 and 16 of 16 tokens
    # 0.01 of 16 tokens: evaluated as 1 token (6.25 %) under the label 0.01
    with pytest.raises(
        ConfigError, match=r"0.01 keeps no token of encoder 'enc''s 16 .* of 1/16 = 0.0625 keeps one"
    ):
        check_fractions(TokensConfig(fractions=[0.01, 0.5]), "enc", (4, 4))
    with pytest.raises(ConfigError, match=r"0.25 and 0.27 both keep 4 of encoder 'enc''s 16 tokens"):
        check_fractions(TokensConfig(fractions=[0.25, 0.27]), "enc", (4, 4))
    with pytest.raises(
        ConfigError, match=r"0.99 keeps all 16 tokens of encoder 'enc'; use 1.0 .* below 0.9688"
    ):
        check_fractions(TokensConfig(fractions=[0.5, 0.99]), "enc", (4, 4))
