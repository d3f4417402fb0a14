"""Encode stage: a dataset split through one frozen encoder into its content-addressed feature store.

Work is done shard by shard (`shard_images` images); a finished shard is never redone, so a killed run resumes
where it stopped and a finished store returns at once. Bad images are skipped and recorded, never fatal.
"""

from __future__ import annotations

import contextlib
import functools
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from pipeline import artifacts, bars, cpus, stop
from pipeline.artifacts import WriteLock
from pipeline.config import Layer, config_hash
from pipeline.data import decode_workers, worker_processes
from pipeline.data.datasets import ImageRecord, files_sample, image_list_sha256, list_images
from pipeline.data.store_info import check_same_image_files, check_some_encoded
from pipeline.data.store_opening import check_free_space, open_or_create
from pipeline.data.store_writer import BackgroundShardWriter, Landing, add_batch, shard_buffer
from pipeline.jobs import EncodeJob
from pipeline.models import encoders
from pipeline.models.weights import weights_key
from pipeline.provenance import provenance
from storage import FeatureStore, StoreLayout, open_store
from storage.format import DECODING_DEFAULTS
from storage.precision import resolve_codecs


@dataclass(frozen=True)
class EncodeResult:
    store_path: Path
    n_images: int
    n_encoded: int
    n_failed: int
    already_complete: bool
    # where this run's time went (wall seconds, summing to the run's): setup, model load, workers start (the
    # decode workers), decode wait, model (the copy to the device and the forward), to host (statistics,
    # quantisation, the copies back), into buffers (pixels and failures into the shard buffers), device wait (the
    # host waiting for a batch's features: on a GPU, all of the above is queued, and this is the GPU's time that
    # the host's work did not cover), writer wait, finish; empty for a store that was already complete
    seconds: dict[str, float] = field(default_factory=dict)

    def timing(self) -> str:
        """One line: the run's seconds and the share of each step, the bottleneck first."""
        total = sum(self.seconds.values())
        parts = sorted(self.seconds.items(), key=lambda kv: -kv[1])
        return f"{total:.1f} s: " + ", ".join(f"{step} {s:.1f} s" for step, s in parts)


def store_key(job: EncodeJob, records: list[ImageRecord], compute_dtype: torch.dtype) -> dict:
    """Everything that determines a store's content; its hash names the store folder."""
    return {
        "dataset": {"name": job.dataset.name, "kind": job.dataset.kind, "split": job.split},
        "subset": job.subset.model_dump(mode="json"),
        "image_list_sha256": image_list_sha256(records),
        "encoder": job.encoder.model_dump(mode="json", exclude={"name"}),
        "weights": weights_key(job.encoder),
        "image_transform": job.transform.model_dump(mode="json"),
        "store": job.store.model_dump(mode="json"),
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "image_limits": {"min_side": job.options.min_image_side, "max_pixels": job.options.max_image_pixels},
        "geometry": job.options.geometry,
        # transformers' processors split an odd crop margin by floor; such stores made before were rounded
        **(
            {"crop_offset": "floor"}
            if job.options.geometry == "native" and job.encoder.backend == "transformers"
            else {}
        ),
        **{
            option: getattr(job.options, option)
            for option, older in DECODING_DEFAULTS.items()
            if getattr(job.options, option) != older
        },  # absent at the older keys' values: they stay valid
        **({"embeddings": True} if stores_embeddings(job) else {}),  # absent otherwise: older keys stay valid
    }


def stores_embeddings(job: EncodeJob) -> bool:
    """encode.embeddings asks for them and the encoder has a head to pool and project with."""
    return job.options.embeddings and job.encoder.keep_head


def store_path_for(job: EncodeJob, key: dict) -> Path:
    return artifacts.folder(
        job.store_root,
        f"{job.encoder.name}__{job.dataset.name}-{job.split}__{job.transform.tag}",
        key,
        ".zarr",
    )


def _batches_within_shards(
    pending_shards: list[int], layout: StoreLayout, batch_size: int
) -> list[list[int]]:
    # Batches never straddle shards, so a resumed run batches exactly like an uninterrupted one (same numerics).
    batches = []
    for shard in pending_shards:
        rows = layout.shard_slice(shard)
        for start in range(rows.start, rows.stop, batch_size):
            batches.append(list(range(start, min(start + batch_size, rows.stop))))
    return batches


def plan(job: EncodeJob) -> tuple[list[ImageRecord], dict, Path]:
    """The job's images, store key and store folder, without encoding anything."""
    records = list_images(job.dataset, job.split, job.subset)
    device = encoders.resolve_device(job.options.device)
    key = store_key(job, records, encoders.resolve_compute_dtype(job.options.compute_dtype, device))
    path = store_path_for(job, key)
    if (path / "zarr.json").is_file():
        check_same_image_files(open_store(path, require_complete=False), records, job.dataset.root)
    return records, key, path


def run(job: EncodeJob, *, progress: bool = True) -> EncodeResult:
    """Encode `job` into its store and return where it is; resumes a partial store, returns a finished one."""
    return run_layers([job], progress=progress)[0]


def one_pass_key(job: EncodeJob) -> str:
    """Jobs with equal keys differ only in the encoder's feature layer: one forward pass can fill all their stores."""
    layerless = job.encoder.model_copy(
        update={"name": "", "feature_layer": -1, "patch_size": 1, "hidden_dim": None, "n_prefix_tokens": None}
    )
    return repr(replace(job, encoder=layerless))


def run_layers(jobs: list[EncodeJob], *, progress: bool = True) -> list[EncodeResult]:
    """The stores of several feature layers of one encoder (same split, transform and options), each exactly the
    store `run` makes for its own job, from one forward pass per batch: the model runs once up to the deepest
    layer asked for, and every store still missing a shard gets its layer's features."""
    run_start = time.perf_counter()
    if len({one_pass_key(job) for job in jobs}) != 1:
        raise ValueError("run_layers: the jobs must differ only in the encoder's feature layer")
    planned = [plan(job) for job in jobs]
    results: list[EncodeResult | None] = [_finished(path) for _, _, path in planned]
    todo = [i for i, result in enumerate(results) if result is None]
    if not todo:
        return results
    with ExitStack() as locks:
        for i in sorted(todo, key=lambda i: planned[i][2]):  # one order: two runs never wait on each other
            locks.enter_context(WriteLock(planned[i][2]))
        for i in todo:  # another run may have finished some between our check and the locks
            results[i] = _finished(planned[i][2])
        todo = [i for i in todo if results[i] is None]
        if not todo:
            return results
        job = jobs[todo[0]]
        start = time.perf_counter()
        encoder = encoders.load(
            job.encoder, device=job.options.device, compute_dtype=job.options.compute_dtype,
            geometry=job.options.geometry,
        )  # fmt: skip
        targets = []
        for i in todo:
            records, key, path = planned[i]
            view = encoder.at_layer(jobs[i].encoder)
            store = open_or_create(path, key, functools.partial(_new_store, jobs[i], key, records, view))
            check_free_space(store)
            targets.append(_Target(store, view.spec.feature_layer))
        seconds = {"model load": time.perf_counter() - start}
        with cpus.start_cpus() as bound_to:
            if bound_to < len(cpus.START):
                bars.notice(f"encode: this thread was bound to {bound_to} of the process's {len(cpus.START)} CPUs "
                      "(OpenMP's OMP_PROC_BIND or GOMP_CPU_AFFINITY?); the decode workers and writers use all "
                      f"{len(cpus.START)}")  # fmt: skip
            summaries = _encode_pending(
                targets, job, planned[todo[0]][0], encoder, seconds, progress=progress
            )
        # listing the images, hashing the list, locks, opening or creating the stores
        seconds["setup"] = time.perf_counter() - run_start - sum(seconds.values())
    for i, summary in zip(todo, summaries, strict=True):
        path, n = planned[i][2], len(planned[i][0])
        results[i] = EncodeResult(path, n, summary["n_encoded"], summary["n_failed"], False, seconds)
    for result in results:
        check_some_encoded(result.store_path)
    return results


def _finished(path: Path) -> EncodeResult | None:
    if not (path / "zarr.json").is_file():
        return None
    store = open_store(path, require_complete=False)
    if not store.complete or store.damaged_shards():
        return None
    attrs = store.attrs
    return EncodeResult(path, store.n_images, attrs["n_encoded"], attrs["n_failed"], already_complete=True)


def _new_store(job: EncodeJob, key: dict, records: list[ImageRecord], encoder: encoders.Encoder):
    """The layout and attributes of a new store of `job`."""
    layout = StoreLayout(
        n_images=len(records),
        grid_hw=encoder.grid,
        hidden_dim=encoder.hidden_dim,
        pixel_size=encoder.preprocessing.crop_size,
        shard_images=job.store.shard_images,
        precision=job.store.precision,
        store_pixels=job.store.store_pixels,
        **resolve_codecs(job.store.precision, job.store.compressor, job.store.compression_level),
        embedding_dim=encoder.embedding_dim() if stores_embeddings(job) else 0,
    )
    attrs = {
        "config": key,
        "config_hash": config_hash(key),
        "encoder": encoder.describe(),
        "dataset": {**key["dataset"], "subset": key["subset"], "image_list_sha256": key["image_list_sha256"]},
        # Where the images were read from (not part of the key): `store verify` re-reads them from here.
        "dataset_source": {
            **job.dataset.model_dump(mode="json"),
            "root": str(Path(job.dataset.root).resolve()),
        },
        "image_transform": {**key["image_transform"], "tag": job.transform.tag},
        "precision": job.store.precision,
        "provenance": provenance(),
        "n_images": len(records),
        "image_files_sample": files_sample(records),  # content the key does not hold: checked by `plan`
    }
    return layout, attrs


@dataclass(frozen=True)
class _Target:
    store: FeatureStore
    layer: Layer


def _encode_pending(
    targets: list[_Target],
    job: EncodeJob,
    records: list[ImageRecord],
    encoder: encoders.Encoder,
    seconds: dict[str, float],
    *,
    progress: bool,
) -> list[dict]:
    """Encode the targets' missing shards; their finalised summaries. Adds each step's wall seconds to `seconds`
    (the loader's decode workers, the model and the writer threads overlap: the largest is the bottleneck)."""
    seconds.update(
        dict.fromkeys(
            ("decode wait", "model", "to host", "into buffers", "device wait", "writer wait", "finish"), 0.0
        )
    )
    layout = targets[0].store.layout  # every target has the same rows and shards; grids and widths may differ
    pending_by_target = [set(np.flatnonzero(~t.store.shard_done()).tolist()) for t in targets]
    pending = sorted(set().union(*pending_by_target))
    loader = decode_workers.loader(
        decode_workers.DecodeDataset(records, encoder.preprocessing, job.transform, job.options),
        _batches_within_shards(pending, layout, job.options.batch_size),
        num_workers=job.options.num_workers,
        pin_memory=encoder.device.type == "cuda",
    )
    writers = [BackgroundShardWriter(t.store, job.options.writer_threads) for t in targets]
    n_pending_images = sum(len(range(layout.n_images)[layout.shard_slice(i)]) for i in pending)
    bar = bars.bar(
        total=layout.n_images, initial=layout.n_images - n_pending_images, unit="img", disable=not progress,
        desc=f"encode {targets[0].store.path.name[:60]}" + (f" +{len(targets) - 1} layers" if len(targets) > 1 else ""),
        smoothing=0.1,
    )  # fmt: skip
    pinned = encoder.device.type == "cuda"
    # per target, by shard: a batch in flight may hold the shard before the current one
    buffers: list[dict[int, dict]] = [{} for _ in targets]
    in_flight: _InFlight | None = None

    def land() -> None:
        """Wait for the batch in flight; the shard it completes goes to the writers."""
        nonlocal in_flight
        batch, in_flight = in_flight, None
        if batch is None:
            return
        start = time.perf_counter()
        batch.landing.wait()
        seconds["device wait"] += time.perf_counter() - start
        if batch.completes_shard:
            start = time.perf_counter()
            for k in batch.here:  # the first store compresses the pixels; the others link its file
                leader = None if k == batch.here[0] else writers[batch.here[0]]
                writers[k].put({**buffers[k].pop(batch.shard), "pixels_from": leader}, batch.shard_records)
            seconds["writer wait"] += time.perf_counter() - start  # a full queue: writers behind

    try:
        start = time.perf_counter()
        batches = worker_processes.started(loader)
        seconds["workers start"] = time.perf_counter() - start
        for positions, pixels, reasons in _timed(batches, seconds, "decode wait"):
            if stop.requested():  # between batches: the shards written so far are whole
                land()
                for writer in writers:  # before the stop counts as reached: the process may end 3 s after it
                    writer.close()
                stop.check()
            start = time.perf_counter()
            shard = int(positions[0]) // layout.shard_images
            rows = layout.shard_slice(shard)
            here = [k for k, todo in enumerate(pending_by_target) if shard in todo]
            for k in here:
                if shard not in buffers[k]:
                    buffers[k][shard] = shard_buffer(targets[k].store.layout, shard, rows.stop - rows.start,
                                                     writers[k].spent(), pinned)  # fmt: skip
            ok = torch.tensor([not r for r in reasons])
            local = (positions - rows.start).numpy()
            landing = Landing(encoder.device)
            if ok.any():
                # all decoded (the usual batch): the pinned batch itself, no pageable copy before the device copy
                pixels_seen = encoder.normalize(encoder.seen(pixels if ok.all() else pixels[ok]))
                grids = encoder.encode_layers(pixels_seen, [targets[k].layer for k in here])
                pooled = None
                if any("embeddings" in buffers[k][shard] for k in here):
                    with torch.inference_mode():
                        pooled = encoder.embed(pixels_seen)
                seconds["model"] += time.perf_counter() - start  # on a GPU: asked for, not waited for
                for k, grid in zip(here, grids, strict=True):
                    add_batch(buffers[k][shard], local[ok.numpy()], grid, seconds, landing)
                if pooled is not None:
                    for k in [k for k in here if "embeddings" in buffers[k][shard]]:
                        landing.copy(buffers[k][shard], "embeddings", local[ok.numpy()], pooled)
                landing.queue_done()
            start = time.perf_counter()
            failures = [
                {"image_id": records[pos].image_id, "path": str(records[pos].path), "reason": reason}
                for pos, reason in zip(positions.tolist(), reasons, strict=True)
                if reason
            ]
            for k in here:
                buffers[k][shard]["pixels"][local] = pixels.numpy()
                buffers[k][shard]["failures"] += failures
                buffers[k][shard]["n_filled"] += len(reasons)
            seconds["into buffers"] += time.perf_counter() - start
            land()  # the batch before this one, while this one computes
            whole = buffers[here[0]][shard]["n_filled"] == rows.stop - rows.start  # in every store
            in_flight = _InFlight(landing, shard, here, records[rows], whole)
            bar.update(len(reasons))
        land()
        start = time.perf_counter()
        for writer in writers:
            writer.close()
    except BaseException:
        with contextlib.suppress(Exception):  # finished work is kept: the shard the batch in flight completes
            land()
        raise
    finally:
        bar.close()
        for writer in writers:
            writer.close(raise_errors=False)
    summaries = [t.store.finalize() for t in targets]
    seconds["finish"] += time.perf_counter() - start
    return summaries


@dataclass(frozen=True)
class _InFlight:
    """A batch whose features are still on their way to the host, and the shard its rows belong to."""

    landing: Landing
    shard: int
    here: list[int]  # the targets still missing the shard
    shard_records: list[ImageRecord]
    completes_shard: bool  # the shard's last batch: once it lands, the shard goes to the writers


def _timed(items, seconds: dict[str, float], step: str):
    """`items`, adding the time spent waiting for each to `seconds[step]`."""
    while True:
        start = time.perf_counter()
        item = next(items, None)
        seconds[step] += time.perf_counter() - start
        if item is None:
            return
        yield item
