"""Train stage: a reconstructor from a train feature store back to pixels, validated on a val store.

Reads only stores (features + the stored encoder-resolution pixels; no JPEG decoding). Shards are read whole,
in a seeded order, through a bounded in-memory shuffle buffer on a background thread. Checkpoints every epoch;
a killed run resumes from the last one and, on CPU with a fixed seed, ends bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import csv
import json
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipeline import checkpoints, metrics
from pipeline.config import TrainConfig, config_hash
from pipeline.encoders import resolve_compute_dtype, resolve_device
from pipeline.provenance import provenance
from pipeline.reconstructor import Reconstructor
from storage import FeatureStore, StoreError, open_store
from storage.format import WriteLock

# What must agree between the stores a model is trained and used on.
ENCODER_IDENTITY = (
    "backend",
    "model_id",
    "weights_id",
    "feature_layer",
    "grid_hw",
    "hidden_dim",
    "preprocessing",
)


@dataclass(frozen=True)
class TrainJob:
    train_store: Path
    val_store: Path
    cfg: TrainConfig


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    val_metrics: dict
    already_complete: bool


def encoder_identity(store: FeatureStore) -> dict:
    enc = store.attrs["encoder"]
    return {k: enc[k] for k in ENCODER_IDENTITY}


def check_same_encoder(a: FeatureStore, b: FeatureStore) -> None:
    ia, ib = encoder_identity(a), encoder_identity(b)
    diff = [k for k in ENCODER_IDENTITY if ia[k] != ib[k]]
    if diff:
        details = "; ".join(f"{k}: {ia[k]!r} vs {ib[k]!r}" for k in diff)
        raise StoreError(f"stores {a.path.name} and {b.path.name} come from different encoders ({details})")


def open_training_store(path: Path) -> FeatureStore:
    store = open_store(path)  # raises on incomplete / wrong format
    if not store.attrs.get("n_encoded"):
        raise StoreError(f"{path}: store has no encoded images; nothing to train on")
    return store


def build_model(cfg: TrainConfig, store: FeatureStore) -> Reconstructor:
    lay = store.layout
    enc = store.attrs["encoder"]
    return Reconstructor(cfg.model, lay.hidden_dim, lay.grid_hw, enc["patch_size"], enc["resolution"])


def run_key(job: TrainJob, train: FeatureStore, val: FeatureStore) -> dict:
    cfg = job.cfg.model_dump(mode="json", exclude={"output_root", "device", "prefetch_batches"})
    return {"train": cfg, "train_store": train.config_hash, "val_store": val.config_hash}


def run_dir_for(job: TrainJob, key: dict, train: FeatureStore) -> Path:
    return Path(job.cfg.output_root) / f"{train.attrs['encoder']['name']}__{config_hash(key)}"


def batch_stream(
    store: FeatureStore, batch_size: int, seed: int, epoch: int, buffer_images: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(features, pixels) batches of one epoch: shards in a seeded order through a bounded shuffle buffer."""
    rng = np.random.default_rng([seed, epoch])
    lay = store.layout
    pool_feats: list[np.ndarray] = []
    pool_pixels: list[np.ndarray] = []

    def draw(n: int):
        picks = sorted(rng.choice(len(pool_feats), size=n, replace=False), reverse=True)
        out = [(pool_feats[i], pool_pixels[i]) for i in picks]
        for i in picks:  # swap-remove: O(1) per image, no copying of the pool
            pool_feats[i], pool_pixels[i] = pool_feats[-1], pool_pixels[-1]
            pool_feats.pop()
            pool_pixels.pop()
        return np.stack([f for f, _ in out]), np.stack([p for _, p in out])

    for shard in rng.permutation(lay.n_shards):
        rows = lay.shard_slice(int(shard))
        valid = store.group["valid"][rows]
        feats, pixels = store.features(rows)[valid], store.pixels(rows)[valid]
        pool_feats.extend(np.array(f) for f in feats)  # own copies, so the shard's arrays are freed
        pool_pixels.extend(np.array(p) for p in pixels)
        while len(pool_feats) >= buffer_images + batch_size:
            yield draw(batch_size)
    while pool_feats:
        yield draw(min(batch_size, len(pool_feats)))


def n_batches_per_epoch(store: FeatureStore, batch_size: int) -> int:
    return -(-int(store.valid().sum()) // batch_size)


class Prefetcher:
    """Runs a batch iterator on a background thread, `depth` batches ahead, as (pinned) torch tensors."""

    def __init__(self, iterator: Iterator, depth: int, pin: bool):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.pin = pin
        self.thread = threading.Thread(target=self._fill, args=(iterator,), daemon=True)
        self.thread.start()

    def _fill(self, iterator: Iterator) -> None:
        try:
            for feats, pixels in iterator:
                f, p = torch.from_numpy(feats), torch.from_numpy(pixels)
                self.queue.put((f.pin_memory(), p.pin_memory()) if self.pin else (f, p))
        except BaseException as e:  # re-raised in the consumer
            self.queue.put(e)
            return
        self.queue.put(None)

    def __iter__(self):
        while (item := self.queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item


@torch.no_grad()
def validate(
    model, store: FeatureStore, cfg: TrainConfig, device, compute_dtype
) -> tuple[dict, np.ndarray, np.ndarray]:
    """MSE (normalised space), PSNR (dB) and SSIM on [0, 1] images; returns the first images for the grid."""
    pre = store.attrs["encoder"]["preprocessing"]
    rows = np.flatnonzero(store.valid())
    rows = rows[: cfg.n_val_images] if cfg.n_val_images else rows
    model.eval()
    mses, psnrs, ssims, originals, recons = [], [], [], [], []
    for start in range(0, len(rows), cfg.batch_size):
        idx = rows[start : start + cfg.batch_size]
        feats = torch.from_numpy(store.features(idx)).to(device)
        pixels = torch.from_numpy(store.pixels(idx)).to(device)
        target = metrics.normalize_pixels(pixels, pre["mean"], pre["std"])
        with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
            pred = model(feats)
        pred = pred.float()
        mses.append(((pred - target) ** 2).mean(dim=(1, 2, 3)).cpu().numpy())
        pred01 = metrics.denormalize(pred, pre["mean"], pre["std"]).permute(0, 2, 3, 1).cpu().numpy()
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


def write_grid(path: Path, originals_01: np.ndarray, recons_01: np.ndarray, title: str) -> None:
    """Rows of original | reconstruction | per-pixel error map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(originals_01)
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
    for i in range(n):
        err = np.abs(originals_01[i] - recons_01[i]).mean(axis=-1)
        for ax, img, name in zip(
            axes[i],
            (originals_01[i], recons_01[i], err),
            ("original", "reconstruction", "|error|"),
            strict=True,
        ):
            ax.imshow(img, cmap="magma" if img.ndim == 2 else None, vmin=0, vmax=1 if img.ndim == 3 else None)
            ax.set_title(name if i == 0 else "", fontsize=8)
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def run(job: TrainJob, *, progress: bool = True) -> TrainResult:
    """Train (or resume, or return the finished) reconstructor for the job's stores."""
    cfg = job.cfg
    train_store, val_store = open_training_store(job.train_store), open_training_store(job.val_store)
    check_same_encoder(train_store, val_store)
    key = run_key(job, train_store, val_store)
    run_dir = run_dir_for(job, key, train_store)
    if (run_dir / "result.json").is_file():
        return _result(run_dir, already_complete=True)
    with WriteLock(run_dir):
        return _train(cfg, key, run_dir, train_store, val_store, progress)


def _result(run_dir: Path, already_complete: bool) -> TrainResult:
    info = json.loads((run_dir / "result.json").read_text())
    return TrainResult(
        run_dir,
        Path(info["best_checkpoint"]),
        Path(info["last_checkpoint"]),
        info["val_metrics"],
        already_complete,
    )


def _train(cfg: TrainConfig, key: dict, run_dir: Path, train_store, val_store, progress: bool) -> TrainResult:
    from torch.utils.tensorboard import SummaryWriter

    device = resolve_device(cfg.device)
    compute_dtype = resolve_compute_dtype(cfg.compute_dtype, device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, train_store).to(device)
    steps_per_epoch = n_batches_per_epoch(train_store, cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.Adam(
        model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=_warmup_share(cfg.warmup_fraction, total_steps),
        anneal_strategy="cos", cycle_momentum=False,
    )  # fmt: skip
    ckpt_dir = run_dir / "checkpoints"
    header_base = {
        "config": key,
        "config_hash": config_hash(key),
        "train_store": str(train_store.path),
        "train_store_hash": train_store.config_hash,
        "val_store": str(val_store.path),
        "val_store_hash": val_store.config_hash,
        "encoder": encoder_identity(train_store) | {"name": train_store.attrs["encoder"]["name"]},
        "model": {**cfg.model.model_dump(mode="json"), "in_dim": train_store.layout.hidden_dim,
                  "grid_hw": list(train_store.layout.grid_hw), "patch_size": train_store.attrs["encoder"]["patch_size"],
                  "out_size": train_store.attrs["encoder"]["resolution"]},
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
    train_model = torch.compile(model) if cfg.compile else model
    pre = train_store.attrs["encoder"]["preprocessing"]
    writer = SummaryWriter(str(run_dir / "tensorboard"))
    bar = tqdm(
        total=total_steps, initial=step, unit="step", disable=not progress, desc=f"train {run_dir.name}"
    )
    val_metrics: dict = {}
    model.train()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            stream = batch_stream(train_store, cfg.batch_size, cfg.seed, epoch, cfg.shuffle_buffer_images)
            for feats, pixels in Prefetcher(stream, cfg.prefetch_batches, pin=device.type == "cuda"):
                feats = feats.to(device, non_blocking=True)
                target = metrics.normalize_pixels(
                    pixels.to(device, non_blocking=True), pre["mean"], pre["std"]
                )
                with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
                    pred = train_model(feats)
                loss = F.mse_loss(pred.float(), target)
                if cfg.l1_weight:
                    loss = loss + cfg.l1_weight * F.l1_loss(pred.float(), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
                optimizer.step()
                scheduler.step()  # after the optimiser (the released code steps it before)
                step += 1
                writer.add_scalar("train/loss", loss.item(), step)
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", epoch=epoch)
                if step % cfg.val_every_steps == 0 and step % steps_per_epoch:
                    val_metrics = _validate_and_log(model, val_store, cfg, device, compute_dtype, writer,
                                                    run_dir, step, epoch, loss.item(), grid=True)  # fmt: skip
            # Every epoch end: metrics for 'best'; the grid PNG only at validation steps and the last epoch.
            grid = epoch == cfg.epochs - 1 or step % cfg.val_every_steps == 0
            val_metrics = _validate_and_log(model, val_store, cfg, device, compute_dtype, writer,
                                            run_dir, step, epoch, loss.item(), grid=grid)  # fmt: skip
            is_best = val_metrics["val_psnr_db"] > best_psnr
            best_psnr = max(best_psnr, val_metrics["val_psnr_db"])
            header = {**header_base, "epoch": epoch, "step": step, "total_steps": total_steps,
                      "metrics": val_metrics, "best_val_psnr_db": best_psnr}  # fmt: skip
            if is_best:
                checkpoints.save(ckpt_dir, "best", model, header)
            checkpoints.save(ckpt_dir, f"epoch-{epoch:04d}", model, header, optimizer, scheduler)
            for old in sorted(ckpt_dir.glob("epoch-*.json"))[: -cfg.keep_last]:
                for f in ckpt_dir.glob(old.stem + ".*"):
                    f.unlink()
    finally:
        bar.close()
        writer.close()
    last = sorted(ckpt_dir.glob("epoch-*.json"))[-1]
    result = {"best_checkpoint": str(ckpt_dir / "best.json"), "last_checkpoint": str(last),
              "val_metrics": val_metrics or checkpoints.read_header(last)["metrics"], "config_hash": config_hash(key)}  # fmt: skip
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    return _result(run_dir, already_complete=False)


def _warmup_share(warmup_fraction: float, total_steps: int) -> float:
    # OneCycleLR divides by (pct_start * total_steps - 1): keep the warm-up at least ~1.5 steps long.
    return min(0.9, max(warmup_fraction, 1.5 / max(total_steps, 1)))


def _validate_and_log(
    model, store, cfg, device, compute_dtype, writer, run_dir, step, epoch, loss, grid
) -> dict:
    val, originals, recons = validate(model, store, cfg, device, compute_dtype)
    if grid:
        write_grid(run_dir / "samples" / f"step-{step:07d}.png", originals, recons,
                   f"{run_dir.name} epoch {epoch} step {step}: PSNR {val['val_psnr_db']:.2f} dB")  # fmt: skip
    for k, v in val.items():
        writer.add_scalar(f"val/{k}", v, step)
    row = {"step": step, "epoch": epoch, "train_loss": loss, **val, "time": time.time()}
    csv_path = run_dir / "metrics.csv"
    new = not csv_path.is_file()
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)
    return val
