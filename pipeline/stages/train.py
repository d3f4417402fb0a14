"""Train stage: a reconstructor from a train feature store back to pixels, validated on a val store.

Reads only stores (features + the stored encoder-resolution pixels; no JPEG decoding). Shards are read whole,
in a seeded order, through a bounded in-memory shuffle buffer on a background thread. Checkpoints every epoch;
a killed run resumes from the last one and, on CPU with a fixed seed, ends bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import artifacts, bars, stop
from pipeline.artifacts import WriteLock
from pipeline.config import TrainConfig, config_hash
from pipeline.data.feature_loader import EpochBatches, n_batches_per_epoch, widen
from pipeline.data.images import Preprocessing
from pipeline.data.store_info import StoreInfo, check_same_encoder, open_encoded
from pipeline.jobs import TrainJob
from pipeline.models import checkpoints
from pipeline.models.encoders import resolve_compute_dtype, resolve_device
from pipeline.models.reconstructor import Reconstructor
from pipeline.models.resumable import append_csv
from pipeline.models.step_scalars import StepScalars
from pipeline.provenance import provenance
from pipeline.report.figures import write_grid
from pipeline.science import metrics
from storage import FeatureStore

LOG = logging.getLogger("reconlab.train")  # silent in a terminal; a served run's log (flows/prefect_env.py)
# How often the host reads the losses it logs (each read waits for the device; see StepScalars)
LOSS_READ_SECONDS = 1.0


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    checkpoint: Path  # the one later stages use (cfg.select_checkpoint: the last, or the best on val_split)
    last_checkpoint: Path
    val_metrics: dict
    already_complete: bool


def build_model(cfg: TrainConfig, store: FeatureStore) -> Reconstructor:
    lay, info = store.layout, StoreInfo.of(store)
    return Reconstructor(cfg.model, lay.hidden_dim, lay.grid_hw, info.patch_size, info.resolution)


def run_key(
    job: TrainJob, train: FeatureStore, val: FeatureStore, device: torch.device | None = None
) -> dict:
    """The run's identity: the config without its runtime fields, the device and dtype it resolves to (a CPU
    float32 run and a CUDA bf16 run are different results), the stores (key and content) and the number of
    processes."""
    device = device or resolve_device(job.cfg.device)
    # Steps per epoch, the schedule and the effective batch depend on the number of processes under torchrun.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return {
        "train": artifacts.identity(job.cfg),
        "device": device.type,
        "compute_dtype": str(resolve_compute_dtype(job.cfg.compute_dtype, device)).removeprefix("torch."),
        "train_store": StoreInfo.of(train).digest,
        "val_store": StoreInfo.of(val).digest,
        "world_size": world_size,
    }


def key_and_run_dir(job: TrainJob, train: FeatureStore, val: FeatureStore) -> tuple[dict, Path]:
    key = run_key(job, train, val)
    return key, artifacts.folder(job.cfg.output_root, StoreInfo.of(train).encoder_name, key)


@torch.no_grad()
def validate(
    model, store: FeatureStore, cfg: TrainConfig, device, compute_dtype
) -> tuple[dict, np.ndarray, np.ndarray]:
    """MSE (normalised space), PSNR (dB) and SSIM on [0, 1] images; returns the first images for the grid."""
    pre = StoreInfo.of(store).preprocessing
    rows = np.flatnonzero(store.valid())
    rows = rows[: cfg.n_val_images] if cfg.n_val_images else rows
    model.eval()
    mses, psnrs, ssims, originals, recons = [], [], [], [], []
    for start in range(0, len(rows), cfg.batch_size):
        idx = rows[start : start + cfg.batch_size]
        feats = torch.from_numpy(store.features(idx)).to(device)
        pixels = torch.from_numpy(store.pixels(idx)).to(device)
        target = pre.normalize(pixels)
        with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
            pred = model(feats)
        pred = pred.float()
        mses.append(((pred - target) ** 2).mean(dim=(1, 2, 3)).cpu().numpy())
        pred01 = pre.denormalize(pred).permute(0, 2, 3, 1).cpu().numpy()
        true01 = pixels.cpu().numpy().astype(np.float32) / 255.0
        psnrs.append(metrics.psnr_db(true01, pred01))
        ssims.append(metrics.ssim(true01, pred01))
        if sum(len(o) for o in originals) < cfg.n_sample_images:
            originals.append(true01)
            recons.append(pred01)
    model.train()
    result = {
        "val_mse": float(np.concatenate(mses).mean()),
        "val_psnr_db": float(np.concatenate(psnrs).mean()),
        "val_ssim": float(np.concatenate(ssims).mean()),
        "n_val_images": int(len(rows)),
    }
    return (
        result,
        np.concatenate(originals)[: cfg.n_sample_images],
        np.concatenate(recons)[: cfg.n_sample_images],
    )


def train_step(
    model, optimizer, scheduler, feats, pixels, cfg: TrainConfig, pre: Preprocessing, device, compute_dtype
):
    """One optimisation step on a batch of (features, uint8 pixels); returns the loss tensor."""
    feats = widen(feats.to(device, non_blocking=True))  # the loader keeps the stored dtype: less to copy
    target = pre.normalize(pixels.to(device, non_blocking=True))
    with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        pred = model(feats)
    loss = F.mse_loss(pred.float(), target)
    if cfg.l1_weight:
        loss = loss + cfg.l1_weight * F.l1_loss(pred.float(), target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
    optimizer.step()
    scheduler.step()  # after the optimiser (the released code steps it before)
    return loss.detach()


def _log_losses(losses: StepScalars, lrs: dict[int, float], writer, bar, epoch: int) -> float:
    """Log every step's loss and learning rate since the last call (one wait for the device); the last loss."""
    for step, (loss_value,) in losses.read():
        writer.add_scalar("train/loss", loss_value, step)
        writer.add_scalar("train/lr", lrs.pop(step), step)
    bar.set_postfix(loss=f"{loss_value:.4f}", epoch=epoch, refresh=False)  # shown at the bar's own pace
    return loss_value


def run(job: TrainJob, *, progress: bool = True) -> TrainResult:
    """Train (or resume, or return the finished) reconstructor for the job's stores."""
    with artifacts.reading(job.train_store, job.val_store):
        return _run(job, progress)


def _run(job: TrainJob, progress: bool) -> TrainResult:
    cfg = job.cfg
    train_store, val_store = open_encoded(job.train_store), open_encoded(job.val_store)
    check_same_encoder(StoreInfo.of(train_store), StoreInfo.of(val_store))
    key, run_dir = key_and_run_dir(job, train_store, val_store)
    done = artifacts.finished(run_dir / artifacts.RESULT)
    if done is not None and damaged(done) is None:
        return _result(run_dir, already_complete=True)
    # Under torchrun only rank 0 writes (checkpoints, logs), so only it holds the run's lock.
    with WriteLock(run_dir) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext():
        # another run may have finished it while we waited
        done = artifacts.finished(run_dir / artifacts.RESULT)
        if done is not None:
            if (why := damaged(done)) is None:
                return _result(run_dir, already_complete=True)
            _reopen(run_dir, done, why)
        return _train(cfg, key, run_dir, train_store, val_store, progress)


def damaged(result: dict) -> str | None:
    """Why a finished training run must train again (a checkpoint its result names cannot be loaded), or None."""
    return next(
        filter(None, (checkpoints.damage(Path(result[k])) for k in ("checkpoint", "last_checkpoint"))), None
    )


def _reopen(run_dir: Path, result: dict, why: str) -> None:
    """A finished run whose checkpoint is damaged trains again: from its last intact epoch if the last epoch is
    the damaged one, from the start if the selected (best) one is, since selecting it took the whole run."""
    bars.notice(f"{run_dir.name}: {why}; training it again")
    chosen, last = Path(result["checkpoint"]), Path(result["last_checkpoint"])
    gone = [p for p in (last, chosen) if checkpoints.damage(p)]
    if chosen != last and chosen in gone:
        gone += sorted((run_dir / "checkpoints").glob("epoch-*.json"))
    (run_dir / artifacts.RESULT).unlink()
    for header in gone:
        for f in header.parent.glob(f"{header.stem}.*"):
            f.unlink()


def _init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, device) under torchrun (WORLD_SIZE > 1): one process per GPU, or gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _result(run_dir: Path, already_complete: bool) -> TrainResult:
    info = artifacts.finished(run_dir / artifacts.RESULT)
    return TrainResult(
        run_dir,
        Path(info["checkpoint"]),
        Path(info["last_checkpoint"]),
        info["val_metrics"],
        already_complete,
    )


def _train(cfg: TrainConfig, key: dict, run_dir: Path, train_store, val_store, progress: bool) -> TrainResult:
    from torch.utils.tensorboard import SummaryWriter

    rank, world, device = _init_distributed(resolve_device(cfg.device))
    compute_dtype = resolve_compute_dtype(cfg.compute_dtype, device)
    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    model = build_model(cfg, train_store)
    if world > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    # Every rank reads the same seeded stream and takes every world-th batch; the remainder is dropped so all
    # ranks run the same number of steps. Batch size is per device (paper: 10).
    steps_per_epoch = max(1, n_batches_per_epoch(train_store, cfg.batch_size) // world)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.Adam(
        model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    scheduler = lr_schedule(optimizer, cfg, total_steps)
    ckpt_dir = run_dir / "checkpoints"
    info = StoreInfo.of(train_store)
    header_base = {
        "config": key,
        "config_hash": config_hash(key),
        "train_store": str(train_store.path),
        "train_store_hash": train_store.config_hash,
        "val_store": str(val_store.path),
        "val_store_hash": val_store.config_hash,
        "encoder": info.encoder_identity | {"name": info.encoder_name},
        "model": {**cfg.model.model_dump(mode="json"), "in_dim": train_store.layout.hidden_dim,
                  "grid_hw": list(train_store.layout.grid_hw), "patch_size": info.patch_size,
                  "out_size": info.resolution},
        "provenance": provenance(),
    }  # fmt: skip
    start_epoch, step, best_psnr = 0, 0, -float("inf")
    latest = sorted(ckpt_dir.glob("epoch-*.json"))
    if latest:
        header = checkpoints.read_header(latest[-1])
        if header["config_hash"] != config_hash(key):
            raise checkpoints.CheckpointError(
                f"{latest[-1]}: made by training config {header['config_hash']}, this run is {config_hash(key)}"
            )
        checkpoints.load_weights(header, model)
        checkpoints.load_train_state(header, optimizer, scheduler)
        start_epoch, step = header["epoch"] + 1, header["step"]
        best_psnr = header.get("best_val_psnr_db", best_psnr)
        LOG.info("%s: resumed after epoch %d of %d", run_dir.name, start_epoch, cfg.epochs)
    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    train_model = torch.compile(train_model) if cfg.compile else train_model
    pre = info.preprocessing
    lead = rank == 0
    writer = SummaryWriter(str(run_dir / "tensorboard")) if lead else None
    bar = bars.bar(
        total=total_steps,
        initial=step,
        unit="step",
        disable=not (progress and lead),
        desc=f"train {run_dir.name}",
    )
    val_metrics: dict = {}
    losses, lrs, loss_value, last_read = StepScalars(), {}, float("nan"), time.monotonic()
    model.train()
    epochs = EpochBatches(train_store, cfg.batch_size, cfg.seed, range(start_epoch, cfg.epochs),
                          cfg.shuffle_buffer_images, cfg.prefetch_batches, pin=device.type == "cuda")  # fmt: skip
    if device.type == "cuda" and not epochs.in_worker and lead:
        bars.notice("train: /dev/shm cannot hold the loader's batches in flight, so it reads on a thread of this process "
              "(slower on a GPU at small batches); give it more room (docker run --shm-size=2g)")  # fmt: skip
    try:
        for epoch in range(start_epoch, cfg.epochs):
            for i, (feats, pixels) in enumerate(epochs.of(epoch)):
                if i % world != rank or i >= steps_per_epoch * world:
                    continue
                stop.check()  # between steps: a rerun resumes from the last epoch's checkpoint
                loss = train_step(
                    train_model, optimizer, scheduler, feats, pixels, cfg, pre, device, compute_dtype
                )
                step += 1
                bar.update(1)
                if not lead:
                    continue
                losses.add(step, loss)
                lrs[step] = scheduler.get_last_lr()[0]
                validating = step % cfg.val_every_steps == 0 and step % steps_per_epoch
                if validating or time.monotonic() - last_read >= LOSS_READ_SECONDS:
                    loss_value, last_read = _log_losses(losses, lrs, writer, bar, epoch), time.monotonic()
                if validating:
                    val_metrics = _validate_and_log(model, val_store, cfg, device, compute_dtype, writer,
                                                    run_dir, step, epoch, loss_value, grid=True)  # fmt: skip
            if not lead:
                _barrier(world)  # wait for rank 0's checkpoint of this epoch
                continue
            loss_value = _log_losses(losses, lrs, writer, bar, epoch) if len(losses) else loss_value
            # Every epoch end: metrics for 'best'; the grid PNG only at validation steps and the last epoch.
            grid = epoch == cfg.epochs - 1 or step % cfg.val_every_steps == 0
            val_metrics = _validate_and_log(model, val_store, cfg, device, compute_dtype, writer,
                                            run_dir, step, epoch, loss_value, grid=grid)  # fmt: skip
            LOG.info("%s: epoch %d of %d, train loss %.4f, val PSNR %.2f dB, SSIM %.3f", run_dir.name, epoch + 1,
                     cfg.epochs, loss_value, val_metrics["val_psnr_db"], val_metrics["val_ssim"])  # fmt: skip
            is_best = val_metrics["val_psnr_db"] > best_psnr
            best_psnr = max(best_psnr, val_metrics["val_psnr_db"])
            header = {**header_base, "epoch": epoch, "step": step, "total_steps": total_steps,
                      "metrics": val_metrics, "best_val_psnr_db": best_psnr}  # fmt: skip
            if is_best and cfg.select_checkpoint == "best_val":
                checkpoints.save(ckpt_dir, "best", model, header | {"selected_on_store": str(val_store.path)})
            checkpoints.save(ckpt_dir, f"epoch-{epoch:04d}", model, header, optimizer, scheduler)
            for old in sorted(ckpt_dir.glob("epoch-*.json"))[: -cfg.keep_last]:
                for f in ckpt_dir.glob(old.stem + ".*"):
                    f.unlink()
            _barrier(world)
    finally:
        epochs.close()
        bar.close()
        if writer is not None:
            writer.close()
    if not lead:
        _barrier(world)  # rank 0 writes result.json
        return _result(run_dir, already_complete=False)
    last = sorted(ckpt_dir.glob("epoch-*.json"))[-1]
    chosen = last
    if cfg.select_checkpoint == "best_val":
        chosen = ckpt_dir / "best.json"
        if not chosen.is_file():  # validation never produced a finite PSNR
            checkpoints.save(ckpt_dir, "best", model,
                             checkpoints.read_header(last) | {"best_is_last": True, "selected_on_store": str(val_store.path)})  # fmt: skip
    artifacts.finish(run_dir / artifacts.RESULT, key,
                     {"checkpoint": str(chosen), "last_checkpoint": str(last), "select_checkpoint": cfg.select_checkpoint,
                      "val_metrics": val_metrics or checkpoints.read_header(last)["metrics"]})  # fmt: skip
    _barrier(world)
    return _result(run_dir, already_complete=False)


def lr_schedule(optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The released code's CycleScheduler shape: linear warm-up from lr/25 to lr over warmup_fraction of the
    steps, then cosine decay to lr/25/1e4 (the paper only says 'cyclic, 5% warm-up')."""
    warmup = max(1, round(cfg.warmup_fraction * total_steps))
    start = 1 / 25
    return torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        [
            torch.optim.lr_scheduler.LinearLR(
                optimizer, start_factor=start, end_factor=1.0, total_iters=warmup
            ),
            torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=max(1, total_steps - warmup), eta_min=cfg.lr * start / 1e4
            ),
        ],
        milestones=[warmup],
    )


def _validate_and_log(
    model, store, cfg, device, compute_dtype, writer, run_dir, step, epoch, loss, grid
) -> dict:
    val, originals, recons = validate(model, store, cfg, device, compute_dtype)
    if grid:
        write_grid(run_dir / "samples" / f"step-{step:07d}.png", originals, recons,
                   f"{run_dir.name} epoch {epoch} step {step}: PSNR {val['val_psnr_db']:.2f} dB")  # fmt: skip
    for k, v in val.items():
        writer.add_scalar(f"val/{k}", v, step)
    append_csv(
        run_dir / "metrics.csv",
        {"step": step, "epoch": epoch, "train_loss": loss, **val, "time": time.time()},
    )
    return val
