"""Operators stage: fit linear operators between an encoder's features of x and of T(x), analyse them, and
look at what they do through a trained reconstructor.

Pairs are never materialised: Dask reduces the two Zarr stores shard by shard into sufficient statistics
(pipeline/science/operator_fits.py), on the threaded scheduler or a dask.distributed cluster.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
from safetensors.numpy import save_file

from pipeline import artifacts, bars, stop
from pipeline.artifacts import WriteLock, write_json_atomic
from pipeline.config import OperatorPairSpec, config_hash
from pipeline.data.store_info import StoreInfo, check_same_encoder, open_encoded
from pipeline.data.transforms import REGISTRY, expected_spectrum
from pipeline.jobs import OperatorJob
from pipeline.models import checkpoints
from pipeline.models.checkpoints import (
    check_checkpoint_matches_store,
    check_held_out,
    load_reconstructor,
    reconstruct,
    training_run_of,
)
from pipeline.provenance import provenance
from pipeline.science import metrics, operator_fits
from storage import FeatureStore, StoreError, open_store


@dataclass(frozen=True)
class OperatorResult:
    out_dir: Path
    table: list[dict]
    already_complete: bool


def _normalized_tokens(store: FeatureStore, rows: np.ndarray) -> np.ndarray:
    flat = store.features(rows).reshape(-1, store.layout.hidden_dim)
    # As the reconstructor sees them: per-token L2 normalisation (in place: these arrays are the big ones).
    flat /= np.maximum(np.linalg.norm(flat, axis=-1, keepdims=True), 1e-12)
    return flat


def _shard_stats(source_path: str, target_path: str, rows: np.ndarray) -> operator_fits.PairStats:
    source, target = open_store(source_path), open_store(target_path)
    return operator_fits.PairStats.of(_normalized_tokens(source, rows), _normalized_tokens(target, rows))


def _tree_sum(parts: list, fan_in: int = 8):
    while len(parts) > 1:
        parts = [dask.delayed(sum)(parts[i + 1 : i + fan_in], parts[i]) for i in range(0, len(parts), fan_in)]
    return parts[0]


def collect_stats(
    source: Path,
    target: Path,
    rows: np.ndarray,
    shard_images: int,
    dask_address: str | None = None,
    progress: bool = False,
) -> operator_fits.PairStats:
    """Σ b aᵀ, Σ a aᵀ, Σ‖b‖² and n over the given rows: one Dask task per shard, summed in a tree."""
    by_shard = [rows[rows // shard_images == s] for s in np.unique(rows // shard_images)]
    parts = [dask.delayed(_shard_stats)(str(source), str(target), r) for r in by_shard]
    total = _tree_sum(parts)
    if dask_address:
        from dask.distributed import Client

        with Client(dask_address) as client:
            if progress:
                bars.notice(f"operator statistics on {dask_address}; progress: {client.dashboard_link}")
            return client.compute(total).result()
    from dask.diagnostics import ProgressBar

    with (
        ProgressBar(minimum=1.0) if progress else contextlib.nullcontext()
    ):  # shown if it takes over a second
        return total.compute(scheduler="threads")


def numpy_stats(source: Path, target: Path, rows: np.ndarray) -> operator_fits.PairStats:
    """The same statistics from arrays loaded whole into memory (reference and benchmark baseline)."""
    return operator_fits.PairStats.of(
        _normalized_tokens(open_store(source), rows), _normalized_tokens(open_store(target), rows)
    )


def fits_for(pair: OperatorPairSpec, configured: list[str] | None) -> list[tuple[str, str]]:
    """(fit, why it is not run or '') for a pair: the paper's fits for its transform unless configured."""
    transform = pair.transform
    involutive = REGISTRY[transform.name].involutive
    # The paper: an involution (symmetric orthogonal) for the colour swap, least squares for the others.
    default = ["involution", "procrustes", "least_squares"] if involutive else ["least_squares", "procrustes"]
    return [
        (
            fit,
            ""
            if fit != "involution" or involutive
            else f"{transform.name} is not its own inverse (T∘T ≠ id)",
        )
        for fit in (configured or default)
    ]


def fit_key_and_dir(job: OperatorJob, identity: FeatureStore, transformed: FeatureStore, header: dict):
    """The fit's identity (both stores, the reconstructor's training hash and weights, pair, settings) and folder."""
    source, target = (identity, transformed) if job.pair.direction == "forward" else (transformed, identity)
    key = {
        "source_store": StoreInfo.of(source).digest, "target_store": StoreInfo.of(target).digest, "checkpoint": header["config_hash"],
        "checkpoint_weights_sha256": checkpoints.weights_sha256(header),
        # the config without its pair list: this fit's pair is above, and the others' are not this fit's inputs
        "pair": artifacts.identity(job.pair), "cfg": {k: v for k, v in artifacts.identity(job.cfg).items() if k != "pairs"},
        "statistics": operator_fits.STATISTICS,  # fits made by an earlier method are not re-used
        "involution": operator_fits.INVOLUTION,
    }  # fmt: skip
    label = f"{StoreInfo.of(identity).encoder_name}__{job.pair.transform.tag}-{job.pair.direction}"
    return key, artifacts.folder(job.cfg.output_root, label, key)


def run(job: OperatorJob, *, progress: bool = False) -> OperatorResult:
    """Fit, analyse and save the operators of one (encoder, transform, direction); cached on its inputs."""
    with artifacts.reading(job.identity_store, job.transform_store, training_run_of(job.checkpoint)):
        return _run(job, progress)


def _run(job: OperatorJob, progress: bool) -> OperatorResult:
    identity, transformed = open_encoded(job.identity_store), open_encoded(job.transform_store)
    check_same_encoder(StoreInfo.of(identity), StoreInfo.of(transformed))
    if not np.array_equal(identity.image_ids(), transformed.image_ids()):
        raise StoreError(
            f"{identity.path.name} and {transformed.path.name} do not hold the same images in order"
        )
    source, target = (identity, transformed) if job.pair.direction == "forward" else (transformed, identity)
    model, header = load_reconstructor(job.checkpoint)
    check_checkpoint_matches_store(header, identity)
    rows = np.flatnonzero(identity.valid() & transformed.valid())
    fit_rows, test_rows = rows[: job.cfg.n_fit_images], rows[job.cfg.n_fit_images :]
    if test_rows.size == 0:
        raise StoreError(f"{identity.path.name}: {rows.size} usable images leave none to test on after "
                         f"n_fit_images={job.cfg.n_fit_images}")  # fmt: skip
    check_held_out(identity, rows, header, f"operator images of {identity.path.name}")
    key, out_dir = fit_key_and_dir(job, identity, transformed, header)
    finished = artifacts.finished(out_dir / artifacts.RESULT)
    if finished is not None:
        return OperatorResult(out_dir, finished["table"], True)
    with WriteLock(out_dir):
        if (
            finished := artifacts.finished(out_dir / artifacts.RESULT)
        ) is not None:  # finished while we waited
            return OperatorResult(out_dir, finished["table"], True)
        table = _fit_and_analyse(job, key, out_dir, source, target, fit_rows, test_rows, model, progress)
    return OperatorResult(out_dir, table, False)


def _fit_and_analyse(
    job, key, out_dir: Path, source, target, fit_rows, test_rows, model, progress
) -> list[dict]:
    from pipeline.report.figures import eigenvalue_plot, operator_grid

    cfg = job.cfg
    k = source.layout.shard_images
    if progress:
        bars.notice(
            f"operators {out_dir.name}: statistics of {fit_rows.size} fit and {test_rows.size} test images"
        )
    fit_stats = collect_stats(source.path, target.path, fit_rows, k, cfg.dask_address, progress)
    test_stats = collect_stats(source.path, target.path, test_rows, k, cfg.dask_address, progress)
    eval_rows = test_rows[: cfg.n_eval_images] if cfg.n_eval_images else test_rows
    pre = StoreInfo.of(source).preprocessing
    a_feats, b_feats = source.features(eval_rows), target.features(eval_rows)
    x_pixels, y_pixels = source.pixels(eval_rows), target.pixels(eval_rows)
    y01 = y_pixels.astype(np.float32) / 255

    def scores(images_uint8: np.ndarray) -> dict:
        test01 = images_uint8.astype(np.float32) / 255
        return {
            "mse": float(np.mean((test01 - y01) ** 2)),
            "psnr_db": float(metrics.psnr_db(y01, test01).mean()),
            "ssim": float(metrics.ssim(y01, test01).mean()),
        }

    recon_a, recon_b = reconstruct(model, a_feats, pre), reconstruct(model, b_feats, pre)
    table = [
        {"fit": "none: R(a) vs target", **scores(recon_a)},
        {"fit": "oracle: R(b) vs target", **scores(recon_b)},
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    grid_columns = {"source x": x_pixels, "target": y_pixels, "R(a)": recon_a}
    transform = job.pair.transform
    predicted = expected_spectrum(transform.name, transform.params, job.pair.direction)
    for fit_type, not_run in fits_for(job.pair, cfg.fits):
        stop.check()  # the fit's record is written once, whole: a rerun fits again
        if not_run:
            table.append({"fit": fit_type, "not_run": not_run})
            continue
        op, facts = operator_fits.fit(fit_stats, fit_type, cfg.ridge)
        eig = operator_fits.eigen_summary(op, cfg.eigen_tolerance)
        # The reconstructor L2-normalises its input tokens: least-squares outputs are re-normalised there.
        mapped = np.einsum("nhwd,ed->nhwe", a_feats, op.astype(np.float32))
        recon_op = reconstruct(model, mapped, pre)
        grid_columns[f"R(A a) {fit_type}"] = recon_op
        row = {
            "fit": fit_type,
            **scores(recon_op),
            "residual_train": operator_fits.relative_residual(op, fit_stats),
            "residual_test": operator_fits.relative_residual(op, test_stats),
            "involution_error": operator_fits.involution_error(op),
            **{k: v for k, v in eig.items() if k != "eigenvalues"},
            "prediction": operator_fits.PREDICTIONS[predicted] if predicted else "none stated",
            "prediction_holds": operator_fits.prediction_holds(predicted, eig) if predicted else None,
            **facts,
        }
        table.append(row)
        save_file({"operator": op.astype(np.float32)}, str(out_dir / f"{fit_type}.safetensors"))
        header = {"schema_version": 1, "key": key, "config_hash": config_hash(key), "fit": fit_type,
                  "transform": transform.model_dump(mode="json"), "direction": job.pair.direction,
                  "source_store": str(source.path), "target_store": str(target.path), "checkpoint": str(job.checkpoint),
                  "n_fit_pairs": fit_stats.n_pairs, "n_test_pairs": test_stats.n_pairs,
                  "n_fit_images": int(fit_rows.size), "n_test_images": int(test_rows.size), "row": row,
                  "provenance": provenance()}  # fmt: skip
        write_json_atomic(out_dir / f"{fit_type}.json", header)
        eigenvalue_plot(eig, out_dir / f"{fit_type}_eigenvalues.png",
                        f"{transform.tag} {job.pair.direction}: {fit_type}")  # fmt: skip
    grid_columns["R(b) oracle"] = recon_b
    operator_grid(grid_columns, cfg.n_grid_images, out_dir / "grid.png", f"{out_dir.name}")
    _write_table(out_dir, table)
    artifacts.finish(out_dir / artifacts.RESULT, key, {"table": table, "n_fit_images": int(fit_rows.size),
                     "n_test_images": int(test_rows.size), "n_eval_images": int(eval_rows.size)})  # fmt: skip
    return table


def _write_table(out_dir: Path, table: list[dict]) -> None:
    import pandas as pd

    frame = pd.DataFrame(table).set_index("fit")
    frame.to_csv(out_dir / "fits.csv")
    columns = [c for c in ("psnr_db", "ssim", "residual_test", "involution_error", "n_inside_unit_circle",
                           "n_on_unit_circle", "n_outside_unit_circle", "spectral_radius", "prediction_holds",
                           "not_run") if c in frame]  # fmt: skip
    fitted = [row for row in table if "prediction" in row]
    verdicts = ", ".join(f"{row['fit']} {'holds' if row['prediction_holds'] else 'FAILS'}" for row in fitted
                         if row["prediction_holds"] is not None)  # fmt: skip
    prediction = f"Paper's prediction: {fitted[0]['prediction']}" if fitted else ""
    if verdicts:
        prediction += f" — {verdicts}"
    (out_dir / "fits.md").write_text(frame[columns].to_markdown(floatfmt=".4g") + "\n\n" + prediction + "\n")
