"""Operators: fits against known answers, the Dask reduction, the linear-encoder swap, disjointness, the stage."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import scipy.linalg
from scipy.stats import ortho_group

from pipeline.config import (
    OperatorPairSpec,
    OperatorsConfig,
    StoreOptions,
    SubsetSpec,
    TrainConfig,
    TransformSpec,
)
from pipeline.data.transforms import swap_rb
from pipeline.models.checkpoints import DisjointnessError
from pipeline.science.operator_fits import (
    PairStats,
    eigen_summary,
    fit,
    involution_error,
    least_squares,
    nearest_involution,
    procrustes,
    relative_residual,
)
from pipeline.stages import encode, operators, train
from storage import StoreLayout, create, open_store
from storage.precision import value_stats


def _unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_procrustes_recovers_a_planted_orthogonal_matrix_from_noiseless_pairs():
    q = ortho_group.rvs(32, random_state=0)
    a = _unit_rows(500, 32, 1)
    assert np.abs(procrustes(PairStats.of(a, a @ q.T)) - q).max() < 1e-5


def test_involution_fit_recovers_a_planted_involution():
    basis = ortho_group.rvs(24, random_state=2)
    planted = basis @ np.diag(np.where(np.arange(24) % 3 == 0, -1.0, 1.0)) @ basis.T
    a = _unit_rows(400, 24, 3)
    op, facts = fit(PairStats.of(a, a @ planted.T), "involution")
    assert np.abs(op - planted).max() < 1e-5 and facts["distance_from_procrustes_fro"] < 1e-4


def test_procrustes_agrees_with_scipy_orthogonal_procrustes_on_noisy_pairs():
    rng = np.random.default_rng(4)
    a = _unit_rows(300, 16, 5)
    b = a @ ortho_group.rvs(16, random_state=6).T + 0.1 * rng.normal(size=(300, 16))
    rotation, _ = scipy.linalg.orthogonal_procrustes(a, b)  # argmin ||a R - b||: rows, so A = R^T
    assert np.allclose(procrustes(PairStats.of(a, b)), rotation.T, atol=1e-5)


@pytest.mark.parametrize("ridge", [0.0, 0.5])
def test_least_squares_agrees_with_numpy_lstsq(ridge):
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(200, 12)), rng.normal(size=(200, 12))
    design = np.vstack([a, np.sqrt(ridge) * np.eye(12)])
    targets = np.vstack([b, np.zeros((12, 12))])
    expected = np.linalg.lstsq(design, targets, rcond=None)[0].T
    assert np.allclose(least_squares(PairStats.of(a, b), ridge), expected, atol=1e-5)


def test_the_involution_projection_is_symmetric_orthogonal_with_eigenvalues_plus_minus_one():
    inv = nearest_involution(np.random.default_rng(8).normal(size=(20, 20)))
    assert np.allclose(inv, inv.T) and np.allclose(inv @ inv.T, np.eye(20), atol=1e-10)
    assert np.allclose(np.sort(np.abs(np.linalg.eigvalsh(inv))), 1.0) and involution_error(inv) < 1e-9


def test_relative_residual_from_statistics_equals_the_direct_computation():
    rng = np.random.default_rng(9)
    a, b, op = rng.normal(size=(100, 8)), rng.normal(size=(100, 8)), rng.normal(size=(8, 8))
    direct = np.linalg.norm(a @ op.T - b) / np.linalg.norm(b)
    assert np.isclose(relative_residual(op, PairStats.of(a, b)), direct)


def _linear_store(path, pixels_nhwc: np.ndarray, embedding: np.ndarray, ids: np.ndarray):
    """A store whose 'encoder' is linear: normalised 4x4 patches (48 values) times an orthogonal 48x48 matrix."""
    n, s = len(pixels_nhwc), pixels_nhwc.shape[1]
    g = s // 4
    x = pixels_nhwc.astype(np.float32) / 127.5 - 1
    patches = x.reshape(n, g, 4, g, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, g, g, 48)
    feats = patches @ embedding.T
    layout = StoreLayout(n, (g, g), 48, s, 8, "float32", "blosc_zstd_shuffle")
    enc = {"name": "linear", "backend": "none", "model_id": "linear", "weights_id": "planted", "feature_layer": "last",
           "grid_hw": [g, g], "hidden_dim": 48, "preprocessing": {"mean": [0.5] * 3, "std": [0.5] * 3}}  # fmt: skip
    store = create(path, layout, {"config_hash": path.name, "encoder": enc})
    for shard in range(layout.n_shards):
        rows = layout.shard_slice(shard)
        record = {"n_encoded": rows.stop - rows.start, "failures": [], "stats": value_stats(feats[rows])}
        store.write_shard(
            shard, feats[rows], pixels_nhwc[rows], ids[rows], np.ones(rows.stop - rows.start, bool), record
        )
    store.finalize()
    return path


def test_a_linear_encoder_gives_a_swap_operator_exact_to_precision_with_eigenvalues_plus_minus_one(tmp_path):
    rng = np.random.default_rng(10)
    pixels = rng.integers(0, 256, size=(24, 16, 16, 3), dtype=np.uint8)
    embedding = ortho_group.rvs(48, random_state=11)
    ids = np.arange(24)
    plain = _linear_store(tmp_path / "x.zarr", pixels, embedding, ids)
    swapped = _linear_store(tmp_path / "tx.zarr", np.stack([swap_rb(p) for p in pixels]), embedding, ids)
    rows = np.arange(24)
    stats = operators.collect_stats(plain, swapped, rows, shard_images=8)
    op, _ = fit(stats, "procrustes")
    # From float32-accumulated statistics the residual is a difference of O(n) terms: ~1e-4 is its noise floor.
    assert relative_residual(op, stats) < 1e-3
    fx, ftx = open_store(plain).features(), open_store(swapped).features()
    unit = lambda f: f / np.linalg.norm(f, axis=-1, keepdims=True)  # noqa: E731
    assert np.abs(unit(fx) @ op.T - unit(ftx)).max() < 1e-5
    eig = eigen_summary(op, tol=1e-4)
    assert eig["n_near_plus_one"] + eig["n_near_minus_one"] == 48 and eig["n_near_minus_one"] == 16
    assert involution_error(op) < 1e-4


def test_the_dask_reduction_equals_the_numpy_one(tmp_path):
    rng = np.random.default_rng(12)
    pixels = rng.integers(0, 256, size=(20, 16, 16, 3), dtype=np.uint8)
    emb = ortho_group.rvs(48, random_state=13)
    a = _linear_store(tmp_path / "a.zarr", pixels, emb, np.arange(20))
    b = _linear_store(
        tmp_path / "b.zarr", rng.integers(0, 256, size=(20, 16, 16, 3), dtype=np.uint8), emb, np.arange(20)
    )
    rows = np.array([0, 1, 2, 5, 8, 9, 13, 19])
    via_dask = operators.collect_stats(a, b, rows, shard_images=8)
    in_memory = operators.numpy_stats(a, b, rows)
    assert via_dask.n_pairs == in_memory.n_pairs == 8 * 16
    assert np.allclose(via_dask.cross_ba, in_memory.cross_ba, atol=1e-4)
    assert np.allclose(via_dask.gram_aa, in_memory.gram_aa, atol=1e-4)


@pytest.fixture
def operator_setup(make_job, tmp_path):
    """Tiny stores: a train store with its reconstructor (1 epoch), and val stores of x and swap_rb(x)."""
    opts = StoreOptions(shard_images=4)
    train_store = encode.run(make_job(subset=SubsetSpec(max_images=8), store=opts), progress=False).store_path
    identity = encode.run(make_job(split="val", store=opts), progress=False).store_path
    swapped = encode.run(
        make_job(split="val", store=opts, transform=TransformSpec(name="swap_rb")), progress=False
    ).store_path
    cfg = TrainConfig(
        output_root=tmp_path / "train",
        epochs=1,
        batch_size=4,
        n_val_images=4,
        n_sample_images=2,
        shuffle_buffer_images=4,
    )
    checkpoint = train.run(train.TrainJob(train_store, identity, cfg), progress=False).checkpoint
    return train_store, identity, swapped, checkpoint


def test_the_operators_stage_writes_operators_plots_grid_and_table_and_caches(operator_setup, tmp_path):
    _, identity, swapped, checkpoint = operator_setup
    cfg = OperatorsConfig(output_root=tmp_path / "ops", n_fit_images=8, n_eval_images=4, n_grid_images=2)
    job = operators.OperatorJob(
        identity, swapped, OperatorPairSpec(transform=TransformSpec(name="swap_rb")), checkpoint, cfg
    )
    result = operators.run(job)
    names = {p.name for p in result.out_dir.iterdir()}
    for fit_type in ("procrustes", "involution", "least_squares"):
        assert {f"{fit_type}.safetensors", f"{fit_type}.json", f"{fit_type}_eigenvalues.png"} <= names
        header = json.loads((result.out_dir / f"{fit_type}.json").read_text())
        assert (
            header["n_fit_images"] == 8 and header["n_test_images"] == 4 and header["n_fit_pairs"] == 8 * 16
        )
    assert {"grid.png", "fits.md", "fits.csv", "result.json"} <= names
    fits = {row["fit"]: row for row in result.table}
    assert fits["involution"]["involution_error"] < 1e-3
    assert fits["least_squares"]["residual_train"] <= fits["procrustes"]["residual_train"] + 1e-9
    assert operators.run(job).already_complete
    # another pair added to the config: this pair's fits are still found (the key held the whole pair list)
    more = cfg.model_copy(
        update={"pairs": [*cfg.pairs, OperatorPairSpec(transform=TransformSpec(name="grayscale"))]}
    )
    assert operators.run(dataclasses.replace(job, cfg=more)).already_complete
    assert isinstance(fits["involution"]["prediction_holds"], bool)
    assert "Paper's prediction: T∘T = id" in (result.out_dir / "fits.md").read_text()


def test_fits_default_to_the_papers_per_transform_and_involution_only_for_involutions():
    swap = OperatorPairSpec(transform=TransformSpec(name="swap_rb"))
    blue = OperatorPairSpec(transform=TransformSpec(name="scale_channel", channel="b", alpha=0.25))
    color = OperatorPairSpec(transform=TransformSpec(name="grayscale"), direction="inverse")
    assert operators.fits_for(swap, None) == [("involution", ""), ("procrustes", ""), ("least_squares", "")]
    assert operators.fits_for(blue, None) == [("least_squares", ""), ("procrustes", "")]
    asked = operators.fits_for(color, ["involution", "least_squares"])
    assert asked[0][0] == "involution" and "grayscale is not its own inverse" in asked[0][1]
    assert asked[1] == ("least_squares", "")


def test_the_paper_predicts_an_involution_for_the_swap_and_a_contraction_for_blue_suppression():
    from pipeline.data.transforms import expected_spectrum

    assert expected_spectrum("swap_rb", {}, "forward") == "involution"
    assert expected_spectrum("scale_channel", {"channel": "b", "alpha": 0.0}, "forward") == "contraction"
    assert expected_spectrum("scale_channel", {"channel": "b", "alpha": 2.0}, "forward") is None
    assert expected_spectrum("grayscale", {}, "inverse") is None


def test_operators_refuse_images_the_reconstructor_was_trained_on(operator_setup, make_job, tmp_path):
    train_store, identity, _, checkpoint = operator_setup
    swapped_train = encode.run(
        make_job(
            subset=SubsetSpec(max_images=8),
            store=StoreOptions(shard_images=4),
            transform=TransformSpec(name="swap_rb"),
        ),
        progress=False,
    ).store_path
    cfg = OperatorsConfig(output_root=tmp_path / "ops", n_fit_images=4)
    job = operators.OperatorJob(
        train_store, swapped_train, OperatorPairSpec(transform=TransformSpec(name="swap_rb")), checkpoint, cfg
    )
    with pytest.raises(DisjointnessError, match="8 of its images trained the reconstructor"):
        operators.run(job)


def test_the_reduction_runs_on_a_dask_distributed_cluster_given_its_address(tmp_path):
    from dask.distributed import LocalCluster

    rng = np.random.default_rng(14)
    emb = ortho_group.rvs(48, random_state=15)
    a = _linear_store(
        tmp_path / "a.zarr", rng.integers(0, 256, size=(16, 16, 16, 3), dtype=np.uint8), emb, np.arange(16)
    )
    b = _linear_store(
        tmp_path / "b.zarr", rng.integers(0, 256, size=(16, 16, 16, 3), dtype=np.uint8), emb, np.arange(16)
    )
    rows = np.arange(16)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        on_cluster = operators.collect_stats(
            a, b, rows, shard_images=8, dask_address=cluster.scheduler_address
        )
    local = operators.collect_stats(a, b, rows, shard_images=8)
    assert on_cluster.n_pairs == local.n_pairs and np.allclose(on_cluster.cross_ba, local.cross_ba)
