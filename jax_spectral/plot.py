"""Figures: the density on a log axis (as in the original package's notebooks) and the
eigenvalue list. Needs matplotlib (``pip install 'jax-spectral[plot]'``); it is imported
only when a function here is called. Each function returns the matplotlib ``Figure`` and,
given ``path``, saves it (PNG, PDF or any format matplotlib knows from the suffix).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .validate import write_atomic

__all__ = [
    "plot_densities",
    "plot_density",
    "plot_eigenvalues",
    "plot_log_density",
    "plot_training",
]


def _pyplot():
    # matplotlib picks a file-only backend (Agg) by itself when there is no display.
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'jax-spectral[plot]'") from err
    return plt


def _note(ax, note: str) -> None:
    """The settings, written in small grey type under the axes."""
    ax.annotate(
        note,
        xy=(0, 0),
        xycoords="axes fraction",
        xytext=(0, -32),
        textcoords="offset points",
        va="top",
        fontsize="small",
        color="0.3",
    )


def _finish(fig, path: str | Path | None):
    if path is not None:
        # The format from the suffix, as savefig would choose it; PNG without one.
        kind = Path(path).suffix[1:].lower() or "png"
        write_atomic(path, lambda tmp: fig.savefig(tmp, format=kind, bbox_inches="tight", dpi=150))
    return fig


def plot_density(
    density: Any,
    *,
    outliers: np.ndarray | None = None,
    band: bool = True,
    ylim: tuple[float, float] | None = None,
    title: str | None = None,
    note: str | None = None,
    path: str | Path | None = None,
):
    """Plot a spectral density on a semilogy axis.

    ``density`` is a :class:`jax_spectral.SpectralDensity` (its standard error is drawn as
    a band when ``band``) or a ``(density, grid)`` pair as returned by
    :func:`jax_spectral.tridiag_to_density`. ``outliers`` (eigenvalues, e.g. the top
    Ritz values) are marked with vertical lines. ``ylim`` defaults to ``1e-10`` (the
    original package's floor) up to twice the highest point drawn, so no peak is cut.
    ``note`` (the settings: kernel variance, probes, steps) is written under the axes;
    the legend sits outside them, off the data.
    """
    from .slq import SpectralDensity

    plt = _pyplot()
    grid, values, stderr = SpectralDensity.of(density)
    grid, values = np.asarray(grid), np.asarray(values)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if ylim is None:
        top = np.max(values + stderr) if band and stderr is not None else np.max(values)
        ylim = (1e-10, 2.0 * float(top) if np.isfinite(top) and top > 1e-10 else 1e2)
    floor = ylim[0]
    ax.semilogy(grid, np.maximum(values, floor), color="C0", lw=1.2, label="density")
    if band and stderr is not None and np.all(np.isfinite(stderr)):
        low = np.maximum(values - stderr, floor)
        ax.fill_between(grid, low, values + stderr, color="C0", alpha=0.25, label="± 1 s.e.")
    if outliers is not None:
        for i, value in enumerate(np.atleast_1d(np.asarray(outliers, np.float64))):
            ax.axvline(value, color="C3", lw=0.8, ls="--", label="eigenvalues" if i == 0 else None)
    ax.set_ylim(*ylim)
    return _labelled(fig, ax, "eigenvalue", "density", title, note, path)


def _labelled(fig, ax, xlabel, ylabel, title, note, path):
    """Axis labels, the title, the note under the axes, the legend outside them; saved."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if note:
        _note(ax, note)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", borderaxespad=0)
    return _finish(fig, path)


def plot_eigenvalues(
    values: np.ndarray, *, title: str | None = None, path: str | Path | None = None
):
    """Plot eigenvalues sorted from the largest, one marker each."""
    plt = _pyplot()
    values = np.sort(np.asarray(values, np.float64))[::-1]
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.plot(np.arange(1, len(values) + 1), values, "o", color="C3", ms=4)
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xlabel("rank")
    ax.set_ylabel("eigenvalue")
    if title:
        ax.set_title(title)
    return _finish(fig, path)


def plot_densities(
    densities: dict,
    *,
    title: str | None = None,
    note: str | None = None,
    path: str | Path | None = None,
):
    """Several densities (``{name: density}``, e.g. one per layer; each a
    ``SpectralDensity`` or a ``(density, grids)`` pair), one semilogy panel each, stacked,
    each with its own eigenvalue axis and limits from its data."""
    plt = _pyplot()
    n = len(densities)
    if n == 0:
        raise ValueError("no densities to plot.")
    fig, axes = plt.subplots(n, 1, figsize=(6.4, 1.9 * n + 0.8), squeeze=False)
    from .slq import SpectralDensity

    for ax, (name, density) in zip(axes[:, 0], densities.items(), strict=True):
        grid, values, _ = SpectralDensity.of(density)
        grid, values = np.asarray(grid), np.asarray(values)
        top = float(np.max(values)) if values.size else 1.0
        floor = 1e-10
        ax.semilogy(grid, np.maximum(values, floor), color="C0", lw=1.1)
        ax.set_ylim(floor, 2.0 * top if np.isfinite(top) and top > floor else 1e2)
        ax.set_ylabel("density")
        ax.set_title(name, fontsize="small", loc="left")
    axes[-1, 0].set_xlabel("eigenvalue")
    if title:
        fig.suptitle(title)
    if note:
        _note(axes[-1, 0], note)
    fig.tight_layout()
    return _finish(fig, path)


def plot_log_density(
    log_density: Any,
    *,
    title: str | None = None,
    note: str | None = None,
    path: str | Path | None = None,
):
    """Plot a :class:`jax_spectral.density.LogDensity` (from
    :func:`jax_spectral.density.log_abs_density`): the densities of ``log10 lambda`` for
    the positive eigenvalues and of ``log10 (-lambda)`` for the negative ones, on one
    semilogy axis, with the weight too close to zero for a log axis in the legend."""
    plt = _pyplot()
    grid = np.asarray(log_density.grid)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    floor = 1e-10
    peak = max(float(np.max(log_density.positive)), float(np.max(log_density.negative)))
    for values, color, label in (
        (log_density.positive, "C0", "λ > 0"),
        (log_density.negative, "C3", "λ < 0 (of -λ)"),
    ):
        ax.semilogy(grid, np.maximum(np.asarray(values), floor), color=color, lw=1.2, label=label)
    ax.plot([], [], " ", label=f"|λ| ≤ {log_density.floor:.1e}: {log_density.zero_mass:.2%}")
    ax.set_ylim(floor, 2.0 * peak if np.isfinite(peak) and peak > floor else 1e2)
    return _labelled(fig, ax, "log10 |eigenvalue|", "density per decade", title, note, path)


def plot_training(
    records: list,
    *,
    grid_len: int = 400,
    floor: float = 1e-6,
    title: str | None = None,
    path: str | Path | None = None,
):
    """The spectrum across training, from :func:`jax_spectral.training.load`'s records:
    the density against the step as a heatmap of ``log10 density`` (each record's density
    on one common eigenvalue grid; below ``floor`` drawn as ``floor``), and the top
    eigenvalues against the step, one curve per rank (the paper's figures)."""
    plt = _pyplot()
    if not records:
        raise ValueError("no records to plot.")
    steps = np.array([r["step"] for r in records], dtype=np.float64)
    low = min(float(np.min(r["grid"])) for r in records)
    high = max(float(np.max(r["grid"])) for r in records)
    grid = np.linspace(low, high, grid_len)
    image = np.stack(
        [np.interp(grid, r["grid"], r["density"], left=0.0, right=0.0) for r in records]
    )
    fig, (heat, curves) = plt.subplots(2, 1, figsize=(6.4, 6.4), sharex=False)
    mesh = heat.pcolormesh(
        grid, steps, np.log10(np.maximum(image, floor)), shading="nearest", cmap="viridis"
    )
    fig.colorbar(mesh, ax=heat, label="log10 density")
    heat.set_xlabel("eigenvalue")
    heat.set_ylabel("step")
    k = max(len(r["top_eigenvalues"]) for r in records)
    for rank in range(k):
        values = [
            r["top_eigenvalues"][rank] if rank < len(r["top_eigenvalues"]) else np.nan
            for r in records
        ]
        curves.plot(steps, values, "o-", ms=3, lw=1, label=f"λ{rank + 1}")
    curves.set_xlabel("step")
    curves.set_ylabel("top eigenvalues")
    curves.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", borderaxespad=0)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _finish(fig, path)
