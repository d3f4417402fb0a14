"""Fitting linear operators A with f(T x) ≈ A f(x) from sufficient statistics, and analysing them.

All fits take the statistics of the pairs (a = source token, b = target token, both L2-normalised):
cross-covariance C = Σ b aᵀ, Gram G = Σ a aᵀ, Σ‖b‖², and the pair count. SVDs, eigendecompositions and solves
come from scipy.linalg.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

FIT_TYPES = ("procrustes", "involution", "least_squares")
# How the statistics are summed, in each fit's cache key. Until 2026-11-28: float32 products, and least squares
# cut off directions below D x eps32 of the largest Gram eigenvalue (real ones, on anisotropic features).
STATISTICS = "float64 products of float32 tokens"
INVOLUTION = "sign(sym(C)), the least-squares optimum among symmetric orthogonal matrices"


@dataclass
class PairStats:
    """Sufficient statistics of (a, b) token pairs, float64."""

    cross_ba: np.ndarray  # Σ b aᵀ  [D, D]
    gram_aa: np.ndarray  # Σ a aᵀ  [D, D]
    sum_sq_b: float  # Σ ‖b‖²
    n_pairs: int

    def __add__(self, other: PairStats) -> PairStats:
        return PairStats(
            self.cross_ba + other.cross_ba,
            self.gram_aa + other.gram_aa,
            self.sum_sq_b + other.sum_sq_b,
            self.n_pairs + other.n_pairs,
        )

    @staticmethod
    def of(a_nd: np.ndarray, b_nd: np.ndarray) -> PairStats:
        """The tokens as float32 (as stored features are read), their products in float64, a block of rows at a
        time: float32 products put rounding noise of ~1e-7 of the largest eigenvalue into the Gram matrix, and
        cutting it off removed real directions of anisotropic features (least_squares)."""
        a, b = a_nd.astype(np.float32, copy=False), b_nd.astype(np.float32, copy=False)
        d = a.shape[1]
        stats = PairStats(np.zeros((d, d)), np.zeros((d, d)), 0.0, len(a))
        for start in range(0, len(a), BLOCK_ROWS):
            a64 = a[start : start + BLOCK_ROWS].astype(np.float64)
            b64 = b[start : start + BLOCK_ROWS].astype(np.float64)
            stats.cross_ba += b64.T @ a64
            stats.gram_aa += a64.T @ a64
            stats.sum_sq_b += float(np.sum(b64**2))
        return stats


BLOCK_ROWS = 8192  # tokens widened to float64 at a time: 50 MB per array at D = 768


def procrustes(stats: PairStats) -> np.ndarray:
    """Orthogonal A minimising Σ‖A a − b‖²: A = U Vᵀ from the SVD of Σ b aᵀ = U S Vᵀ."""
    u, _, vt = scipy.linalg.svd(stats.cross_ba)
    return u @ vt


def nearest_involution(a: np.ndarray) -> np.ndarray:
    """The nearest symmetric orthogonal matrix to `a` (eigenvalues ±1): sign of the symmetric part's eigenvalues."""
    sym = (a + a.T) / 2
    eigvals, eigvecs = scipy.linalg.eigh(sym)
    signs = np.where(eigvals >= 0, 1.0, -1.0)
    return (eigvecs * signs) @ eigvecs.T


def least_squares(stats: PairStats, ridge: float = 0.0) -> np.ndarray:
    """Unconstrained linear A minimising Σ‖A a − b‖² + ridge ‖A‖²: A = C (G + ridge I)⁺.

    The pseudo-inverse gives the minimum-norm solution (as numpy.linalg.lstsq) when there are fewer pairs than
    dimensions or the features span a subspace, which singular-matrix solves would refuse.
    """
    # pinvh's float64 cut-off (D x eps x the largest eigenvalue): the Gram matrix sums float64 products, so every
    # direction above it is in the data (float16 rounding of stored features included), as lstsq keeps them.
    return stats.cross_ba @ scipy.linalg.pinvh(stats.gram_aa + ridge * np.eye(stats.gram_aa.shape[0]))


def fit(stats: PairStats, fit_type: str, ridge: float = 0.0) -> tuple[np.ndarray, dict]:
    """Fit one operator; returns it with fit-specific facts (e.g. how far the involution projection moved)."""
    if fit_type == "procrustes":
        return procrustes(stats), {}
    if fit_type == "involution":
        # For an orthogonal A, Σ‖A a − b‖² = Σ‖a‖² + Σ‖b‖² − 2 tr(A Cᵀ), and for a symmetric one tr(A Cᵀ) =
        # tr(A sym(C)) ≤ Σ|λ(sym(C))| (von Neumann), reached by A = sign(sym(C)): the least-squares optimum among
        # symmetric orthogonal matrices. The nearest involution to the Procrustes A (before 2026-11-28) is not it.
        inv = nearest_involution(stats.cross_ba)
        return inv, {"distance_from_procrustes_fro": float(np.linalg.norm(inv - procrustes(stats)))}
    if fit_type == "least_squares":
        return least_squares(stats, ridge), {"ridge": ridge}
    raise ValueError(f"unknown fit type {fit_type}; known: {FIT_TYPES}")


def relative_residual(op: np.ndarray, stats: PairStats) -> float:
    """sqrt(Σ‖A a − b‖² / Σ‖b‖²) from the statistics: tr(A G Aᵀ) − 2 tr(A Cᵀ) + Σ‖b‖²."""
    sq = np.trace(op @ stats.gram_aa @ op.T) - 2 * np.trace(op @ stats.cross_ba.T) + stats.sum_sq_b
    return float(np.sqrt(max(sq, 0.0) / max(stats.sum_sq_b, 1e-300)))


def eigen_summary(op: np.ndarray, tol: float = 0.1) -> dict:
    """Eigenvalues and where they sit: inside, on (|λ| within 1 ± tol) or outside the unit circle, how many of
    those on it are near +1 or −1, and the spectral radius."""
    eig = scipy.linalg.eigvals(op)
    modulus = np.abs(eig)
    return {
        "eigenvalues": eig,
        "n_inside_unit_circle": int(np.sum(modulus < 1 - tol)),
        "n_on_unit_circle": int(np.sum(np.abs(modulus - 1) <= tol)),
        "n_outside_unit_circle": int(np.sum(modulus > 1 + tol)),
        "n_near_plus_one": int(np.sum(np.abs(eig - 1) < tol)),
        "n_near_minus_one": int(np.sum(np.abs(eig + 1) < tol)),
        "spectral_radius": float(modulus.max()),
        "max_abs_imag": float(np.abs(eig.imag).max()),
        "tolerance": tol,
    }


# What the paper predicts for an operator's spectrum, by the kind of pixel transform it stands for.
PREDICTIONS = {
    "involution": "T∘T = id, so A² ≈ I: every eigenvalue near +1 or −1",
    "contraction": "T tends to a projection as α → 0: every eigenvalue near +1 or inside the unit circle",
}


def prediction_holds(kind: str, eig: dict) -> bool:
    """Whether the eigen summary agrees with the prediction of PREDICTIONS[kind]."""
    if kind == "involution":
        return eig["n_near_plus_one"] + eig["n_near_minus_one"] == len(eig["eigenvalues"])
    if kind == "contraction":  # on the circle only at +1: a rotation (|λ| = 1 elsewhere) is no contraction
        return eig["n_outside_unit_circle"] == 0 and eig["n_on_unit_circle"] == eig["n_near_plus_one"]
    raise ValueError(f"unknown prediction '{kind}'; known: {', '.join(PREDICTIONS)}")


def involution_error(op: np.ndarray) -> float:
    """‖A² − I‖_F: zero for an exact involution (colour swap applied twice is the identity)."""
    return float(np.linalg.norm(op @ op - np.eye(op.shape[0])))
