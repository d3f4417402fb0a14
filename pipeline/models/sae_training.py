"""Training sparse autoencoders on a store's patch tokens: the input screen (per-dimension mean/std and token
norms, outliers named), the settings a config sweeps, and a resumable training loop that streams shards through
the bounded shuffle buffer (the same seed gives the same batches; a killed run resumes bit-identical on CPU)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import bars, stop
from pipeline.config import ConfigError, SaeConfig
from pipeline.data.feature_loader import Prefetcher, batch_stream, widen
from pipeline.models import checkpoints, resumable
from pipeline.models.sae import SparseAutoencoder, training_loss
from pipeline.models.step_scalars import StepScalars
from storage import FeatureStore


@dataclass(frozen=True)
class SaeSpec:
    """One trained SAE: a variant at one sparsity setting (k, or the L0 / L1 coefficient) and seed."""

    kind: str
    sparsity: float
    seed: int
    text_share: float | None = None  # embedding SAEs: the share of caption vectors in training batches

    @property
    def name(self) -> str:
        setting = f"k{int(self.sparsity)}" if self.kind in ("topk", "batchtopk") else f"c{self.sparsity:g}"
        mix = "" if self.text_share is None else f"-t{self.text_share:g}"
        return f"{self.kind}-{setting}-s{self.seed}{mix}"


def sweep(cfg: SaeConfig, kind: str) -> list[float]:
    return {"topk": cfg.k, "batchtopk": cfg.k, "jumprelu": cfg.l0_coefficients, "relu": cfg.l1_coefficients}[
        kind
    ]


def primary(cfg: SaeConfig) -> SaeSpec:
    """The first variant at the middle of its sweep, first seed (and first image:text mix): the SAE the concept
    analyses use."""
    values = sweep(cfg, cfg.variants[0])
    share = cfg.text_shares[0] if cfg.inputs == "embeddings" else None
    return SaeSpec(cfg.variants[0], values[len(values) // 2], cfg.seeds[0], share)


def check_dictionary(cfg: SaeConfig, dim: int, what: str) -> None:
    """Top-k keeps k of the dictionary's expansion x dim latents: a larger k failed mid-training (topk) or trained a
    dense code (batchtopk)."""
    n_latents = cfg.expansion * dim
    k = max(cfg.k) if {"topk", "batchtopk"} & set(cfg.variants) else 0
    if k >= n_latents:
        raise ConfigError(f"sae.k {k} is not below the dictionary's {n_latents} latents (sae.expansion "
                          f"{cfg.expansion} x {dim}, the width of {what}); set every k below {n_latents}")  # fmt: skip


def sae_specs(cfg: SaeConfig) -> list[SaeSpec]:
    """The primary setting with every seed (and, for embeddings, every mix), then every other (variant, sparsity)
    with the first seed."""
    main = primary(cfg)
    specs = [SaeSpec(main.kind, main.sparsity, seed, main.text_share) for seed in cfg.seeds]
    if cfg.inputs == "embeddings":
        specs += [SaeSpec(main.kind, main.sparsity, main.seed, share) for share in cfg.text_shares]
    specs += [
        SaeSpec(kind, value, main.seed, main.text_share)
        for kind in cfg.variants
        for value in sweep(cfg, kind)
    ]
    return list(dict.fromkeys(specs))


def tokens_of(feats_nhwd: torch.Tensor) -> torch.Tensor:
    """A batch of features (read, or as `batch_stream` gives them) as float32 token vectors [N * H * W, D]."""
    feats = widen(feats_nhwd)
    return feats.reshape(-1, feats.shape[-1])


def screen(chunks) -> dict:
    """Per-dimension mean and std and vector-norm quantiles of the training vectors (`chunks`: arrays [n, D]),
    in float64; outlier dimensions are those whose |mean| or std exceeds 10x the median std (a few huge dimensions
    dominate unit-normalised vectors and can leave most latents dead at initialisation)."""
    total, total_sq, n, norms = 0.0, 0.0, 0, []
    for x in chunks:
        x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
        total, total_sq, n = total + x.sum(0), total_sq + (x * x).sum(0), n + len(x)
        norms.append(np.linalg.norm(x, axis=1))
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean**2, 0))
    limit = 10 * np.median(std)
    outliers = np.flatnonzero((np.abs(mean) > limit) | (std > limit))
    norms = np.concatenate(norms)
    return {"n_vectors": n, "mean": mean, "std": std, "median_std": float(np.median(std)),
            "outlier_dims": outliers.tolist(),
            "outlier_share_of_energy": float(((mean**2 + std**2)[outliers]).sum() / (mean**2 + std**2).sum()),
            "norm_quantiles": {q: float(np.quantile(norms, q)) for q in (0.01, 0.5, 0.99)}}  # fmt: skip


class TokenSource:
    """Patch tokens of a store: images streamed through the shuffle buffer, all their tokens per step."""

    def __init__(self, store: FeatureStore, cfg: SaeConfig):
        self.store, self.cfg = store, cfg
        self.dim = store.layout.hidden_dim

    def screen_chunks(self, max_images: int = 1024):
        rows = np.flatnonzero(self.store.valid())[:max_images]
        return (self.store.features(rows[i : i + 64]) for i in range(0, len(rows), 64))

    def batches(self, seed: int, epoch: int, pin: bool):
        stream = batch_stream(self.store, self.cfg.batch_images, seed, epoch, self.cfg.shuffle_buffer_images,
                              pixels=False)  # fmt: skip
        for feats, _ in Prefetcher(stream, 4, pin=pin):
            yield feats


class EmbeddingSource:
    """Image embeddings of a store and caption embeddings of a caption store, mixed `share` captions to 1 − share
    images per batch; each side read in shuffled chunks through a bounded buffer (seeded: same seed, same batches).
    An epoch is as many vectors as both sides hold."""

    def __init__(self, store: FeatureStore, text_path: Path, cfg: SaeConfig, share: float):
        import zarr

        self.cfg, self.share = cfg, share
        self.images, self.image_rows = store, np.flatnonzero(store.valid())
        self.text = zarr.open_group(str(text_path), mode="r")["text_embeddings"]
        self.dim = self.text.shape[1]

    def screen_chunks(self, max_vectors: int = 4096):
        yield self.images.embeddings(self.image_rows[:max_vectors])
        yield self.text[:max_vectors]

    def _side(self, read, n: int, rng, chunk: int = 1024):
        """Endless vectors of one side: chunks in a random order through a shuffle buffer of ~2 chunks."""
        buffer, keep = np.empty((0, self.dim), np.float32), min(chunk, n) // 2
        while True:
            for start in rng.permutation(np.arange(0, n, chunk)):
                buffer = np.concatenate([buffer, read(start, min(start + chunk, n))])
                rng.shuffle(buffer)
                while len(buffer) > keep:
                    take, buffer = buffer[: len(buffer) - keep], buffer[len(buffer) - keep :]
                    yield from take

    def batches(self, seed: int, epoch: int, pin: bool):
        rng = np.random.default_rng([seed, epoch])
        images = self._side(
            lambda a, b: self.images.embeddings(self.image_rows[a:b]), len(self.image_rows), rng
        )
        texts = self._side(lambda a, b: self.text[a:b], self.text.shape[0], rng)
        batch = self.cfg.batch_vectors
        n_text = round(self.share * batch)
        for _ in range(-(-(len(self.image_rows) + self.text.shape[0]) // batch)):
            vectors = [next(texts) for _ in range(n_text)] + [next(images) for _ in range(batch - n_text)]
            out = torch.from_numpy(np.stack(vectors).astype(np.float32))
            yield out.pin_memory() if pin else out


def build(spec: SaeSpec, cfg: SaeConfig, dim: int) -> SparseAutoencoder:
    k = int(spec.sparsity) if spec.kind in ("topk", "batchtopk") else 0
    return SparseAutoencoder(dim, cfg.expansion * dim, spec.kind, k, cfg.center, cfg.unit_norm_inputs,
                             cfg.jumprelu_bandwidth, cfg.jumprelu_threshold, cfg.uses_decoder_bias())  # fmt: skip


def load(path: Path, device: str | torch.device = "cpu") -> tuple[SparseAutoencoder, dict]:
    """An SAE checkpoint on its own (normalisation included) in eval mode, and its header."""
    header = checkpoints.read_header(path)
    g = header["model"]
    sae = SparseAutoencoder(
        g["dim"],
        g["n_latents"],
        g["kind"],
        g["k"],
        g["center"],
        g["unit_norm_inputs"],
        decoder_bias=g.get("decoder_bias", True),
    )
    checkpoints.load_weights(header, sae)
    return sae.to(device).eval(), header


def train_sae(source: TokenSource | EmbeddingSource, spec: SaeSpec, cfg: SaeConfig, out_dir: Path,
              input_mean: np.ndarray, header_base: dict, device: torch.device, compute_dtype: torch.dtype,
              progress: bool = False) -> Path:  # fmt: skip
    """Train (or resume, or find finished) one SAE on the source's vectors; returns its final checkpoint."""
    if (out_dir / "final.json").is_file():
        return out_dir / "final.json"
    torch.manual_seed(spec.seed)
    dim = source.dim
    sae = build(spec, cfg, dim)
    sae.input_mean.copy_(torch.from_numpy(input_mean.astype(np.float32)))
    sae = sae.to(device)
    optimizer = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=cfg.lr)
    header = header_base | {"sae": {"kind": spec.kind, "sparsity": spec.sparsity, "seed": spec.seed,
                                    "text_share": spec.text_share, "name": spec.name},
                            "model": {"dim": dim, "n_latents": sae.n_latents, "kind": spec.kind, "k": sae.k,
                                      "center": cfg.center, "unit_norm_inputs": cfg.unit_norm_inputs,
                                      "decoder_bias": cfg.uses_decoder_bias()}}  # fmt: skip
    start_epoch, step = resumable.resume(out_dir, sae, optimizer, header["config_hash"])
    bar = bars.bar(
        total=cfg.epochs, initial=start_epoch, unit="epoch", disable=not progress, desc=f"sae {spec.name}"
    )
    try:
        for epoch in range(start_epoch, cfg.epochs):
            scalars = StepScalars()
            for batch in source.batches(spec.seed, epoch, pin=device.type == "cuda"):
                stop.check()
                x = tokens_of(batch.to(device, non_blocking=True))
                with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
                    loss, parts, codes = training_loss(
                        sae, x, spec.sparsity, cfg.aux_coefficient, cfg.dead_window
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.float().backward()
                sae.project_decoder_grad()
                optimizer.step()
                sae.after_step(codes.detach().float())
                step += 1
                scalars.add(step, loss, parts["mse"], (codes != 0).sum(dim=-1).float().mean())
            n_batches = len(scalars)
            mean = scalars.sums(3) / max(1, n_batches)
            metrics = {"epoch": epoch, "step": step, "loss": mean[0], "mse": mean[1], "l0": mean[2],
                       "dead_latents": int((sae.vectors_since_fired >= cfg.dead_window).sum())}  # fmt: skip
            resumable.save_epoch(out_dir, sae, optimizer, header, metrics)
            bar.update(1)
    finally:
        bar.close()
    return resumable.save_final(out_dir, sae, header)
