"""The SAE stage: known answers (a planted dictionary is recovered and two seeds agree; R² accumulated over a
whole set; the Bridge Score finds a planted cross-modal pair), the variants' mechanics (unit decoder rows,
BatchTopK codes independent of the batch, JumpReLU's threshold gradient), resume after SIGKILL, and the stage end
to end through the plan on the tiny encoder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import SaeConfig
from pipeline.models import sae_training as st
from pipeline.models.sae import SparseAutoencoder, training_loss
from pipeline.science import sae as science
from storage import open_store
from storage.creation import create
from storage.layout import StoreLayout

ROOT = Path(__file__).resolve().parent.parent


def planted_store(path: Path, n_images: int, seed: int, atoms: np.ndarray, k: int = 3):
    """Tokens (16 per image) that are sums of k of the planted unit atoms with coefficients in [0.5, 1.5]."""
    from storage.precision import value_stats

    rng = np.random.default_rng(seed)
    n_atoms, dim = atoms.shape
    codes = np.zeros((n_images * 16, n_atoms))
    for row in codes:
        row[rng.choice(n_atoms, k, replace=False)] = rng.uniform(0.5, 1.5, k)
    x = (codes @ atoms).astype(np.float32).reshape(n_images, 4, 4, dim)
    layout = StoreLayout(n_images, (4, 4), dim, 8, 64, "float32", "blosc_zstd_shuffle")
    enc = {"name": "planted", "backend": "none", "model_id": "planted", "weights_id": "planted", "feature_layer": "last",
           "grid_hw": [4, 4], "hidden_dim": dim, "preprocessing": {"mean": [0.5] * 3, "std": [0.5] * 3}}  # fmt: skip
    store = create(path, layout, {"config_hash": path.name, "encoder": enc})
    for shard in range(layout.n_shards):
        rows = layout.shard_slice(shard)
        m = rows.stop - rows.start
        store.write_shard(shard, x[rows], np.zeros((m, 8, 8, 3), np.uint8), seed * 100_000 + np.arange(n_images)[rows],
                          np.ones(m, bool), {"n_encoded": m, "failures": [], "stats": value_stats(x[rows])})  # fmt: skip
    store.finalize()
    return open_store(path)


def unit_atoms(n: int, dim: int, seed: int = 0) -> np.ndarray:
    atoms = np.random.default_rng(seed).normal(size=(n, dim))
    return atoms / np.linalg.norm(atoms, axis=1, keepdims=True)


def train(store, spec, cfg, out: Path) -> Path:
    return st.train_sae(st.TokenSource(store, cfg), spec, cfg, out, np.zeros(store.layout.hidden_dim), {"config_hash": "test"},
                        torch.device("cpu"), torch.float32)  # fmt: skip


PLANTED = {
    "k": [3],
    "expansion": 4,
    "batch_images": 16,
    "lr": 3e-3,
    "unit_norm_inputs": False,
    "dead_window": 2000,
}


def test_an_sae_recovers_a_planted_dictionary_and_two_seeds_agree_on_it(tmp_path):
    atoms = unit_atoms(32, 16)
    store = planted_store(tmp_path / "train.zarr", 256, 1, atoms)
    cfg = SaeConfig(variants=["topk"], epochs=40, **PLANTED)
    decoders = []
    for seed in (0, 1):
        sae, _ = st.load(train(store, st.SaeSpec("topk", 3, seed), cfg, tmp_path / f"s{seed}"))
        decoder = sae.decoder.detach().numpy()
        assert np.allclose(np.linalg.norm(decoder, axis=1), 1, atol=1e-5)
        recovered, match = science.match_dictionaries(atoms, decoder)
        assert recovered.mean() > 0.95 and np.median(recovered) > 0.97, recovered
        decoders.append(decoder[match])  # the latents that found the atoms, in atom order
    agreement = (decoders[0] * decoders[1]).sum(axis=1)
    assert np.median(agreement) > 0.95, agreement


def test_without_a_decoder_bias_the_sae_is_x_hat_equals_d_z_as_the_bridge_score_paper(tmp_path):
    from pipeline.report.sae_report import choices_table

    assert SaeConfig(inputs="embeddings").uses_decoder_bias() is False  # arXiv:2504.11695's form
    assert (
        SaeConfig().uses_decoder_bias() is True and SaeConfig(decoder_bias=False).uses_decoder_bias() is False
    )
    store = planted_store(tmp_path / "train.zarr", 32, 1, unit_atoms(8, 16))
    cfg = SaeConfig(variants=["topk"], epochs=2, decoder_bias=False, **PLANTED)
    sae, header = st.load(train(store, st.SaeSpec("topk", 3, 0), cfg, tmp_path / "nobias"))
    assert header["model"]["decoder_bias"] is False and not sae.pre_bias.any()
    x = torch.from_numpy(store.features(slice(0, 4))).flatten(0, 2)
    codes = sae.encode(x)
    torch.testing.assert_close(sae.decode(codes), codes @ sae.decoder)
    biased, _ = st.load(train(store, st.SaeSpec("topk", 3, 0), cfg.model_copy(update={"decoder_bias": True}),
                              tmp_path / "bias"))  # fmt: skip
    assert biased.pre_bias.abs().sum() > 0  # the same training moves a bias when there is one
    table = choices_table(cfg).set_index("setting")
    assert table.loc["decoder bias", "value"] == "none: x̂ = D z"


def test_r2_is_accumulated_over_the_whole_set_not_averaged_over_batches():
    rng = np.random.default_rng(2)
    x = (
        rng.normal(size=(300, 8)) + np.repeat(np.arange(3), 100)[:, None] * 5.0
    )  # batches with different means
    x_hat = x + rng.normal(scale=0.5, size=x.shape)
    whole = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(axis=0)) ** 2).sum()
    fidelity = science.Fidelity()
    per_batch = []
    for start in range(0, 300, 100):
        fidelity.update(x[start : start + 100], x_hat[start : start + 100])
        b, bh = x[start : start + 100], x_hat[start : start + 100]
        per_batch.append(1 - ((b - bh) ** 2).sum() / ((b - b.mean(axis=0)) ** 2).sum())
    assert np.isclose(fidelity.r2, whole, rtol=1e-12)
    assert abs(np.mean(per_batch) - whole) > 0.05  # the mistake the definition rules out


def test_r2_of_vectors_that_do_not_vary_is_nan_and_a_single_held_out_image_is_refused():
    fidelity = science.Fidelity()
    fidelity.update(np.ones((4, 3)), np.full((4, 3), 0.9))  # Σ‖x − μ‖² = 0: R² is undefined (it divided by 0)
    assert np.isnan(fidelity.r2)
    with pytest.raises(ValueError, match="n_eval_images"):
        SaeConfig(n_eval_images=1)


def test_the_recorded_choices_describe_only_what_was_trained():
    from pipeline.report.sae_report import choices_table

    relu_once = choices_table(SaeConfig(variants=["relu"], seeds=[0])).set_index("setting")
    assert (
        "no auxiliary loss" in relu_once.loc["dead latents", "value"]
    )  # AuxK acts on the top-k variants only
    assert not relu_once.loc["variants", "source"].startswith("BatchTopK first")
    assert relu_once.loc["stability", "value"].startswith("not measured")
    assert "JumpReLU" not in relu_once.index and "BatchTopK inference" not in relu_once.index
    assert relu_once.loc["sparsity sweep", "value"] == "ReLU L1 [0.03, 0.1, 0.3]"


def test_a_k_the_dictionary_cannot_hold_and_an_empty_encoder_list_are_config_errors():
    from pipeline.config import ConfigError

    # 4 x 8 = 32 latents: topk's k = 40 failed mid-training ("selected index k out of range")
    st.check_dictionary(SaeConfig(variants=["topk"], k=[4, 31], expansion=4), 8, "the store")
    with pytest.raises(
        ConfigError, match="sae.k 40 is not below the dictionary's 32 latents .*4 x 8, the width"
    ):
        st.check_dictionary(SaeConfig(variants=["batchtopk"], k=[4, 40], expansion=4), 8, "the store")
    st.check_dictionary(SaeConfig(variants=["relu"], k=[40], expansion=4), 8, "the store")  # k unused
    with pytest.raises(ValueError, match="at least 1 item"):  # [] named no encoder and ran the default one
        SaeConfig(encoders=[])


def test_atoms_left_unmatched_by_a_smaller_dictionary_get_nan_and_index_minus_one():
    # 4 atoms against 3: the Hungarian matching pairs 3; the 4th got uninitialised memory (cosine 1.0 or 1.63)
    matched, match = science.match_dictionaries(np.eye(3)[[0, 1, 2, 0]], np.eye(3))
    assert np.isnan(matched).sum() == 1 and (match == -1).sum() == 1
    assert np.nansum(matched) == pytest.approx(3.0) and sorted(match[match >= 0]) == [0, 1, 2]


def test_the_bridge_score_ranks_a_planted_cross_modal_pair_first():
    rng = np.random.default_rng(3)
    n_latents, dim, n_pairs = 12, 32, 400
    decoder = unit_atoms(n_latents, dim, seed=4)
    a, b = 0, 1  # image-only concept a and text-only concept b, atoms pointing partly the same way
    decoder[b] = 0.6 * decoder[a] + 0.8 * unit_atoms(1, dim, seed=5)[0]
    decoder[b] /= np.linalg.norm(decoder[b])
    z_img, z_txt = np.zeros((n_pairs, n_latents)), np.zeros((n_pairs, n_latents))
    fire = rng.random(n_pairs) < 0.3
    z_img[fire, a], z_txt[fire, b] = rng.uniform(1, 2, fire.sum()), rng.uniform(1, 2, fire.sum())
    for j in range(2, n_latents):  # distractors: one modality only, independent of the pair
        modality = z_img if j % 2 else z_txt
        modality[rng.random(n_pairs) < 0.3, j] = rng.uniform(1, 2)
    scores = science.bridge_scores(z_img, z_txt, decoder)
    assert science.top_bridges(scores, 1)[0][:2] == (a, b)
    modality = science.modality_score(science.energy(z_img), science.energy(z_txt))
    assert modality[a] > 0.99 and modality[b] < 0.01


def test_batchtopk_codes_at_inference_do_not_depend_on_the_rest_of_the_batch():
    torch.manual_seed(0)
    sae = SparseAutoencoder(16, 64, "batchtopk", k=4)
    x = torch.randn(32, 16)
    for _ in range(20):  # estimate the threshold on training batches
        _, _, codes = training_loss(sae, x, 0, 0, 10**9)
        sae.after_step(codes.detach())
    assert sae.batch_threshold > 0
    alone = sae.encode(x[:1])
    together = sae.encode(x)[:1]
    assert torch.equal(alone, together)
    batch_codes = training_loss(sae, x, 0, 0, 10**9)[2]
    assert (batch_codes != 0).sum() == 4 * 32  # training: exactly k per vector on average over the batch


def test_jumprelu_passes_a_gradient_to_its_thresholds_through_the_l0_penalty():
    torch.manual_seed(1)
    sae = SparseAutoencoder(8, 32, "jumprelu", initial_threshold=0.05, bandwidth=0.5)
    loss, _, _ = training_loss(sae, torch.randn(64, 8), 1.0, 0, 10**9)
    loss.backward()
    assert sae.log_threshold.grad is not None and sae.log_threshold.grad.abs().sum() > 0


RESUMABLE = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)  # the same reduction order as the runs it is compared with
    sys.path[:0] = [{root!r}, {tests!r}]
    from pathlib import Path
    from test_sae import PLANTED, train
    from pipeline.config import SaeConfig
    from pipeline.models import sae_training as st
    from storage import open_store
    from pipeline.models import resumable
    import time
    save_epoch = resumable.save_epoch
    def save_epoch_then_wait(*args, **kwargs):  # a tiny run's 8 epochs can end between two of the test's polls
        save_epoch(*args, **kwargs)
        time.sleep(0.5)
    resumable.save_epoch = save_epoch_then_wait
    cfg = SaeConfig(variants=["batchtopk"], epochs=8, **PLANTED)
    train(open_store({store!r}), st.SaeSpec("batchtopk", 3, 0), cfg, Path({out!r}))
    """
)


def test_a_killed_sae_training_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, one_thread):
    store = planted_store(tmp_path / "train.zarr", 128, 6, unit_atoms(16, 8))
    cfg = SaeConfig(variants=["batchtopk"], epochs=8, **PLANTED)
    whole = train(store, st.SaeSpec("batchtopk", 3, 0), cfg, tmp_path / "whole")
    killed = tmp_path / "killed"
    script = RESUMABLE.format(
        root=str(ROOT), tests=str(ROOT / "tests"), store=str(store.path), out=str(killed)
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 120
    while not list(killed.glob("epoch-0001.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the training process ended on its own (exit {proc.returncode})"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "final.json").is_file(), "the run finished before it could be killed"
    assert list(killed.glob("epoch-*.json")), "killed before the first checkpoint"
    resumed = train(store, st.SaeSpec("batchtopk", 3, 0), cfg, killed)
    a, b = (
        load_file(str(whole.with_suffix(".safetensors"))),
        load_file(str(resumed.with_suffix(".safetensors"))),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def sae_run(study_root, demo_root, encode_and_train):
    """The stage through the plan on the tiny 64 px encoder: stores, its reconstructor, then the study."""
    from pipeline.stages import sae

    tmp = study_root
    data = {"store_root": str(tmp / "stores"), "dataset": {"name": "demo", "kind": "demo", "root": str(demo_root)},
            "encoders": ["tiny-vit-64"], "store": {"shard_images": 16}, "encode": {"batch_size": 16, "num_workers": 0},
            "train": {"output_root": str(tmp / "train"), "epochs": 1, "batch_size": 8, "n_val_images": 4},
            "sae": {"output_root": str(tmp / "sae"), "variants": ["batchtopk", "relu"], "k": [4, 8],
                    "l1_coefficients": [0.01], "expansion": 2, "epochs": 2, "batch_images": 8, "seeds": [0, 1],
                    "n_edit_latents": 1, "n_sheet_latents": 2, "n_grid_images": 3}}  # fmt: skip
    config = tmp / "sae.yaml"
    run, checkpoint = encode_and_train(data, config, "sae")
    job = run.study_job(run.study_steps("sae")[0], checkpoint)
    return config, job, sae.run(job)


def test_the_stage_writes_the_pareto_table_stability_pixel_cost_and_concept_figures(sae_run):
    import pandas as pd

    _, job, result = sae_run
    pareto = pd.read_csv(result.out_dir / "pareto.csv")
    # the primary setting (batchtopk at the middle of its sweep) with both seeds, the sweep, the PCA baseline
    assert {"batchtopk-k8-s0", "batchtopk-k8-s1", "batchtopk-k4-s0", "relu-c0.01-s0"} <= set(pareto.model)
    assert (pareto.variant == "pca").any() and pareto.r2.between(-1, 1).all()
    topk_rows = pareto[pareto.model == "batchtopk-k4-s0"]
    assert float(topk_rows.l0.iloc[0]) <= 4 * 1.5  # the global threshold keeps about k per token
    report = result.report.read_text()
    assert "Stability of the primary setting" in report and "Recorded choices" in report
    # the report's numbers in files: the seeds' matched cosine was only in report.md
    stability = pd.read_csv(result.out_dir / "stability.csv")
    assert stability[["a", "b"]].values.tolist() == [["batchtopk-k8-s0", "batchtopk-k8-s1"]]
    assert f"{stability['mean matched cosine'].iloc[0]:.4g}" in report
    assert len(pd.read_csv(result.out_dir / "stability_by_energy.csv")) >= 1
    pixel = pd.read_csv(result.out_dir / "pixel_cost.csv")
    assert set(pixel.comparison) == {"R(f) vs image", "R(SAE(f)) vs image", "R(SAE(f)) vs R(f)"}
    for name in ("pareto.png", "energy.png", "sheets.png", "report.html"):
        assert (result.out_dir / name).is_file(), name
    assert list(result.out_dir.glob("edit-*.png"))


def test_a_finished_sae_study_is_found_and_listed_by_the_plan(sae_run):
    from pipeline import plan_table
    from pipeline.config_files import load_run_config
    from pipeline.stages import sae

    config, job, first = sae_run
    assert sae.run(job).already_complete
    rows = [s for s in plan_table.plan(load_run_config(config), config) if s.stage == "sae"]
    assert [r.state for r in rows] == ["cached", "cached"]
    # refused before any work: the encoder's width from its network, built on the meta device
    from pipeline import checks, plan
    from pipeline.config import ConfigError

    cfg = load_run_config(config)
    huge_k = cfg.model_copy(update={"sae": cfg.sae.model_copy(update={"k": [4, 100_000]})})
    with pytest.raises(ConfigError, match=r"sae.k 100000 is not below .* the width of encoder 'tiny-vit-64'"):
        checks.preflight(plan.build(huge_k, config), ("encode", "train", "sae"), check_folders=False)


def test_an_encoder_filter_naming_an_encoder_the_config_lacks_says_which_it_has(sae_run):
    from typer.testing import CliRunner

    from flows.cli import app

    config, _, _ = sae_run
    result = CliRunner().invoke(app, ["sae", "--config", str(config), "-e", "tiny-vit-112"])
    # not even among the config's encoders: the filter says which it has
    assert result.exit_code == 2 and "'tiny-vit-112' is not an encoder of" in result.output, result.output
    assert "(it has tiny-vit-64)" in result.output
    from pipeline import plan
    from pipeline.config import ConfigError
    from pipeline.config_files import load_run_config

    cfg = load_run_config(config)
    both = cfg.model_copy(update={"encoders": [*cfg.encoders, "tiny-vit-112"]})  # in the config, not studied
    with pytest.raises(
        ConfigError, match=r"matches no sae study; the config studies tiny-vit-64 \(sae\.encoders\)"
    ):
        plan.build(both, config, ["tiny-vit-112"]).study_steps("sae", ["tiny-vit-112"])


def test_sparsity_energy_and_bridge_scores_on_hand_computed_values():
    from pipeline.science.sae import Fidelity, bridge_scores, energy

    codes = np.array([[0.0, 2.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 0.0], [4.0, 1.0, 0.0]])
    fidelity = Fidelity()
    fidelity.update(np.ones((2, 2)), np.ones((2, 2)), codes[:2])
    fidelity.update(np.zeros((2, 2)), np.zeros((2, 2)), codes[2:])
    assert fidelity.l0 == 5 / 4  # non-zero codes per vector
    np.testing.assert_array_equal(fidelity.firing_frequency(), [2 / 4, 3 / 4, 0])
    np.testing.assert_array_equal(energy(codes), [5 / 4, 6 / 4, 0])  # mean activation, not the peak
    # two image-caption pairs, two concepts whose unit atoms are 45 degrees apart
    image_codes, text_codes = np.array([[1.0, 0.0], [2.0, 0.0]]), np.array([[0.0, 3.0], [0.0, 1.0]])
    scores = bridge_scores(image_codes, text_codes, np.array([[2.0, 0.0], [1.0, 1.0]]))
    np.testing.assert_allclose(scores, [[0.0, (1 * 3 + 2 * 1) / 2 * 2**-0.5], [0.0, 0.0]])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_pca_baseline_of_a_centred_sae_on_the_gpu_equals_the_one_on_the_cpu():
    """The stage loads its SAEs on its device; the PCA baseline normalises the store's vectors as the SAE does,
    so they must go where the SAE's input mean is."""
    from pipeline.models.sae_analysis import pca_rows

    torch.manual_seed(0)
    sae = SparseAutoencoder(16, 64, "topk", k=4, center=True)
    sae.input_mean.copy_(torch.randn(16))
    chunks = [np.random.default_rng(i).standard_normal((32, 16)).astype(np.float32) for i in range(3)]
    on_cpu = pca_rows(sae, iter(chunks[:2]), lambda: iter(chunks[2:]), [1, 4])
    on_gpu = pca_rows(sae.cuda(), iter(chunks[:2]), lambda: iter(chunks[2:]), [1, 4])
    assert [r["r2"] for r in on_gpu] == pytest.approx([r["r2"] for r in on_cpu], abs=1e-5)
