"""Training the token utility networks from a feature store: the learned selector with its completion (jointly,
the paper's loss), and the completion networks of the baselines on masks of their own kind (random masks,
MAE-style; token-norm masks). Streams shards through the bounded shuffle buffer; checkpoints every epoch (weights,
optimiser and RNG state) so a killed run resumes and, on CPU, ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import bars, stop
from pipeline.config import TokensConfig
from pipeline.data.feature_loader import Prefetcher, batch_stream, n_batches_per_epoch, widen
from pipeline.models import checkpoints, resumable
from pipeline.models.step_scalars import StepScalars
from pipeline.models.token_selector import (
    TokenUtilityModel,
    n_kept,
    norm_mask,
    random_mask,
    straight_through_mask,
)
from storage import FeatureStore


@dataclass(frozen=True)
class NetworkSpec:
    """One trained network: the learned selector + completion, or a baseline's completion, at target fraction p
    (None: a shared baseline completion, trained on k drawn from the evaluated fractions)."""

    method: str  # learned | random | norm
    fraction: float | None

    @property
    def name(self) -> str:
        return f"{self.method}-p{self.fraction:g}" if self.fraction is not None else f"{self.method}-shared"


def network_specs(cfg: TokensConfig) -> list[NetworkSpec]:
    if cfg.selectors == "per_fraction":
        return [NetworkSpec(m, p) for p in sorted(cfg.fractions) for m in ("learned", "random", "norm")]
    return [
        NetworkSpec("learned", cfg.shared_fraction),
        NetworkSpec("random", None),
        NetworkSpec("norm", None),
    ]


def feature_moments(store: FeatureStore, max_images: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of the first `max_images` valid images' tokens (float64 sums), for the
    networks' input standardisation."""
    rows = np.flatnonzero(store.valid())[:max_images]
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, len(rows), 64):
        f = store.features(rows[start : start + 64]).astype(np.float64)
        f = f.reshape(-1, f.shape[-1])
        total, total_sq, count = total + f.sum(0), total_sq + (f * f).sum(0), count + len(f)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def build(spec: NetworkSpec, cfg: TokensConfig, dim: int, n_tokens: int) -> TokenUtilityModel:
    width = cfg.network.width or dim
    heads = max(1, width // cfg.network.head_dim)
    while width % heads:
        heads -= 1
    return TokenUtilityModel(dim, n_tokens, width, cfg.network.depth, heads, spec.method == "learned")


def geometry(model: TokenUtilityModel) -> dict:
    c = model.completer
    return {"dim": int(model.mask_embedding.numel()), "n_tokens": int(c.position.shape[1]),
            "width": int(c.proj_in.out_features), "depth": len(c.blocks.layers),
            "heads": int(c.blocks.layers[0].self_attn.num_heads), "with_selector": model.selector is not None}  # fmt: skip


def load(path: Path, device: str | torch.device = "cpu") -> tuple[TokenUtilityModel, dict]:
    """A token network checkpoint on its own: the model (standardisation included) in eval mode, and its header."""
    header = checkpoints.read_header(path)
    g = header["model"]
    model = TokenUtilityModel(g["dim"], g["n_tokens"], g["width"], g["depth"], g["heads"], g["with_selector"])
    checkpoints.load_weights(header, model)
    return model.to(device).eval(), header


def reconstruction_loss(rebuilt: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor, cfg: TokensConfig):
    if cfg.normalize_tokens:
        rebuilt, tokens = F.normalize(rebuilt, dim=-1), F.normalize(tokens, dim=-1)
    if cfg.loss == "mse":
        per_token = ((rebuilt - tokens) ** 2).mean(dim=-1)
    else:
        per_token = 1 - F.cosine_similarity(rebuilt, tokens, dim=-1)
    if cfg.loss_tokens == "all":
        return per_token.mean()
    dropped = 1 - keep.detach()
    return (per_token * dropped).sum() / dropped.sum().clamp_min(1)


def keep_penalty(kept_fraction: torch.Tensor, target: float, kind: str) -> torch.Tensor:
    """The paper's max(L_pr, p) (no gradient once the kept fraction is at or below p), or a two-sided band."""
    if kind == "floor":
        return torch.clamp(kept_fraction, min=target)
    return (kept_fraction - target).abs()


def step_loss(model: TokenUtilityModel, tokens: torch.Tensor, spec: NetworkSpec, cfg: TokensConfig):
    """(loss, reconstruction term, kept fraction) of one batch of tokens [B, N, D]."""
    b, n, _ = tokens.shape
    if spec.method == "learned":
        keep = straight_through_mask(model.keep_logits(tokens).float(), cfg.gumbel_tau)
    else:
        fraction = spec.fraction
        if (
            fraction is None
        ):  # a shared baseline: k drawn from the evaluated fractions (global RNG: resumable)
            fraction = cfg.fractions[int(torch.randint(len(cfg.fractions), ()).item())]
        k = n_kept(fraction, n)
        # drawn on the CPU (its RNG state is checkpointed); non_blocking: a pageable copy is staged at once
        # instead of waiting for the GPU's queued work
        keep = (
            random_mask(b, n, k).to(tokens.device, non_blocking=True)
            if spec.method == "random"
            else norm_mask(tokens, k)
        )
    recon = reconstruction_loss(model.complete(tokens, keep).float(), tokens, keep, cfg)
    kept = keep.mean()
    loss = recon + keep_penalty(kept, spec.fraction, cfg.keep_penalty) if spec.method == "learned" else recon
    return loss, recon.detach(), kept.detach()


def train_network(
    store: FeatureStore,
    spec: NetworkSpec,
    cfg: TokensConfig,
    out_dir: Path,
    moments: tuple[np.ndarray, np.ndarray],
    header_base: dict,
    device: torch.device,
    compute_dtype: torch.dtype,
    progress: bool = False,
) -> Path:
    """Train (or resume, or find finished) one network; returns its final checkpoint."""
    if (out_dir / "final.json").is_file():
        return out_dir / "final.json"
    torch.manual_seed(cfg.seed * 1_000_003 + zlib.crc32(spec.name.encode()))
    lay = store.layout
    n_tokens, dim = lay.grid_hw[0] * lay.grid_hw[1], lay.hidden_dim
    model = build(spec, cfg, dim, n_tokens)
    model.feature_mean.copy_(torch.from_numpy(moments[0]))
    model.feature_std.copy_(torch.from_numpy(moments[1]))
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    header = header_base | {"network": {"method": spec.method, "fraction": spec.fraction, "name": spec.name},
                            "model": geometry(model)}  # fmt: skip
    start_epoch, step = resumable.resume(out_dir, model, optimizer, header["config_hash"])
    per_epoch = n_batches_per_epoch(store, cfg.batch_size)
    bar = bars.bar(total=per_epoch * cfg.epochs, initial=step, unit="step", disable=not progress,
               desc=f"tokens {spec.name}")  # fmt: skip
    model.train()
    metrics: dict = {}
    try:
        for epoch in range(start_epoch, cfg.epochs):
            scalars = StepScalars()
            stream = batch_stream(
                store, cfg.batch_size, cfg.seed, epoch, cfg.shuffle_buffer_images, pixels=False
            )
            for feats, _ in Prefetcher(stream, 4, pin=device.type == "cuda"):
                stop.check()
                tokens = widen(feats.to(device, non_blocking=True)).flatten(1, 2)
                with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
                    loss, recon, kept = step_loss(model, tokens, spec, cfg)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                scalars.add(step, loss, recon, kept)
                bar.update(1)
            sums = scalars.sums(3)
            n = max(1, per_epoch)
            metrics = {"epoch": epoch, "step": step, "loss": sums[0] / n, "reconstruction": sums[1] / n,
                       "kept_fraction": sums[2] / n}  # fmt: skip
            bar.set_postfix(
                loss=f"{metrics['loss']:.4g}", kept=f"{metrics['kept_fraction']:.3f}", refresh=False
            )
            resumable.save_epoch(out_dir, model, optimizer, header, metrics)
    finally:
        bar.close()
    return resumable.save_final(out_dir, model, header)
