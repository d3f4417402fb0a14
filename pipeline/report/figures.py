"""Figures shared by the stages: validation grids, operator eigenvalues and grids; matplotlib off-screen."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def eigenvalue_plot(eig: dict, path: Path, title: str) -> None:
    plt = pyplot()
    values = eig["eigenvalues"]
    fig, ax = plt.subplots(figsize=(4, 4))
    theta = np.linspace(0, 2 * np.pi, 400)
    ax.plot(np.cos(theta), np.sin(theta), color="0.6", lw=1, label="unit circle")
    ax.scatter(values.real, values.imag, s=8, alpha=0.7)
    ax.axhline(0, color="0.85", lw=0.5)
    ax.axvline(0, color="0.85", lw=0.5)
    ax.set_aspect("equal")
    ax.set_xlabel("Re λ")
    ax.set_ylabel("Im λ")
    ax.set_title(
        f"{title}\ninside: {eig['n_inside_unit_circle']}, on circle: {eig['n_on_unit_circle']} "
        f"(near +1: {eig['n_near_plus_one']}, near −1: {eig['n_near_minus_one']}), "
        f"outside: {eig['n_outside_unit_circle']}; ρ = {eig['spectral_radius']:.3f}",
        fontsize=8,
    )
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def operator_grid(columns: dict[str, np.ndarray], n_rows: int, path: Path, title: str) -> None:
    """One row per image; columns like x | T(x) | R(f(x)) | R(A f(x)) per fit | R(f(T x))."""
    plt = pyplot()
    n_rows = min(n_rows, len(next(iter(columns.values()))))
    fig, axes = plt.subplots(n_rows, len(columns), figsize=(1.8 * len(columns), 1.8 * n_rows), squeeze=False)
    for j, (name, images) in enumerate(columns.items()):
        for i in range(n_rows):
            axes[i, j].imshow(images[i])
            axes[i, j].axis("off")
        axes[0, j].set_title(name, fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def write_grid(path: Path, originals_01: np.ndarray, recons_01: np.ndarray, title: str) -> None:
    """Rows of original | reconstruction | per-pixel error map."""
    plt = pyplot()
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
