"""Sparse-autoencoder analyses as mathematics over arrays: fidelity (R² = 1 − FVU accumulated over a whole
evaluation set in float64), sparsity, dictionary stability across runs (Hungarian matching of unit decoder rows,
arXiv:2504.11695), concept energy, modality scores and the Bridge Score, and the PCA baseline."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment


@dataclass
class Fidelity:
    """R² = 1 − Σ‖x − x̂‖² / Σ‖x − μ‖², both sums over every vector of the evaluation set, μ its one global mean;
    accumulated batch by batch in float64 (never a mean of per-batch ratios). Also mean L0 and how often each
    latent fires."""

    sse: float = 0.0
    total: np.ndarray | None = None  # Σ x per dimension
    total_sq: float = 0.0  # Σ ‖x‖²
    n: int = 0
    l0_sum: float = 0.0
    fired: np.ndarray | None = field(default=None, repr=False)  # vectors each latent was non-zero on

    def update(self, x: np.ndarray, x_hat: np.ndarray, codes: np.ndarray | None = None) -> None:
        x, x_hat = np.asarray(x, np.float64), np.asarray(x_hat, np.float64)
        self.sse += float(((x - x_hat) ** 2).sum())
        self.total = x.sum(axis=0) if self.total is None else self.total + x.sum(axis=0)
        self.total_sq += float((x * x).sum())
        self.n += len(x)
        if codes is not None:
            active = np.asarray(codes) != 0
            self.l0_sum += float(active.sum())
            self.fired = active.sum(axis=0) if self.fired is None else self.fired + active.sum(axis=0)

    @property
    def r2(self) -> float:
        """NaN where the vectors do not vary (one vector, or all equal): R² is undefined there."""
        sst = self.total_sq - float((self.total**2).sum()) / self.n
        return 1.0 - self.sse / sst if sst > 1e-12 * self.total_sq else float("nan")

    @property
    def l0(self) -> float:
        return self.l0_sum / self.n

    def firing_frequency(self) -> np.ndarray:
        return self.fired / self.n


def match_dictionaries(decoder_a: np.ndarray, decoder_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of two dictionaries' atoms (rows) maximising total cosine (Hungarian algorithm on
    −cosine of the unit rows); returns (matched cosine per atom of a, index of its match in b). Where a has more
    atoms than b, those left unmatched get NaN and index −1."""
    a = decoder_a / np.linalg.norm(decoder_a, axis=1, keepdims=True)
    b = decoder_b / np.linalg.norm(decoder_b, axis=1, keepdims=True)
    cosine = a @ b.T
    rows, cols = linear_sum_assignment(-cosine)
    matched = np.full(len(a), np.nan)
    match = np.full(len(a), -1)
    matched[rows], match[rows] = cosine[rows, cols], cols
    return matched, match


def stability_by_energy(matched: np.ndarray, energy: np.ndarray, n_bins: int = 4) -> list[dict]:
    """Mean matched cosine within quantile bins of concept energy (dead concepts, energy 0, in their own bin)."""
    rows = []
    alive = energy > 0
    if (~alive).any():
        rows.append({"energy bin": "dead (never fired)", "n_concepts": int((~alive).sum()),
                     "mean matched cosine": float(matched[~alive].mean())})  # fmt: skip
    if alive.any():
        edges = np.quantile(energy[alive], np.linspace(0, 1, n_bins + 1))
        bins = np.clip(np.searchsorted(edges, energy[alive], side="right") - 1, 0, n_bins - 1)
        for b in range(n_bins):
            members = matched[alive][bins == b]
            if members.size:
                rows.append({"energy bin": f"q{b + 1} [{edges[b]:.3g}, {edges[b + 1]:.3g}]",
                             "n_concepts": int(members.size), "mean matched cosine": float(members.mean())})  # fmt: skip
    return rows


def energy(codes: np.ndarray) -> np.ndarray:
    """A concept's energy: its mean activation over the given vectors (codes [N, L])."""
    return np.asarray(codes, np.float64).mean(axis=0)


def modality_score(energy_image: np.ndarray, energy_text: np.ndarray) -> np.ndarray:
    """Image energy / (image + text energy): 1 = image-only, 0 = text-only; NaN for a concept that never fires."""
    total = energy_image + energy_text
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, energy_image / total, np.nan)


def bridge_scores(codes_image: np.ndarray, codes_text: np.ndarray, decoder: np.ndarray) -> np.ndarray:
    """B = E_pairs[z_img z_txtᵀ] ⊙ (D Dᵀ) over matched image–caption pairs (row i of each is one pair), raw codes,
    unit-norm decoder rows (so D Dᵀ is a cosine matrix). B[a, b] is large when concept a fires on images whose
    captions fire concept b and their atoms point the same way."""
    unit = decoder / np.linalg.norm(decoder, axis=1, keepdims=True)
    co_firing = np.asarray(codes_image, np.float64).T @ np.asarray(codes_text, np.float64) / len(codes_image)
    return co_firing * (unit @ unit.T)


def top_bridges(scores: np.ndarray, n: int, include_diagonal: bool = False) -> list[tuple[int, int, float]]:
    """The n largest entries of B as (image concept, text concept, score), the diagonal left out by default
    (a bridge joins two different concepts)."""
    b = scores.astype(np.float64, copy=True)
    if not include_diagonal:
        np.fill_diagonal(b, -np.inf)
    flat = np.argsort(b, axis=None)[::-1][:n]
    return [(int(i), int(j), float(b[i, j])) for i, j in zip(*np.unravel_index(flat, b.shape), strict=True)]


@dataclass
class Moments:
    """Σx, Σxxᵀ and n in float64, for PCA fitted on a stream of vectors."""

    total: np.ndarray
    outer: np.ndarray
    n: int = 0

    @classmethod
    def empty(cls, dim: int) -> Moments:
        return cls(np.zeros(dim), np.zeros((dim, dim)))

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        self.total += x.sum(axis=0)
        self.outer += x.T @ x
        self.n += len(x)

    def principal_axes(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, components as rows, by decreasing variance)."""
        mean = self.total / self.n
        covariance = self.outer / self.n - np.outer(mean, mean)
        values, vectors = np.linalg.eigh(covariance)
        return mean, vectors[:, np.argsort(values)[::-1]].T


def pca_reconstruct(x: np.ndarray, mean: np.ndarray, components: np.ndarray, k: int) -> np.ndarray:
    """x projected onto the first k principal axes and back."""
    basis = components[:k]
    return (np.asarray(x, np.float64) - mean) @ basis.T @ basis + mean
