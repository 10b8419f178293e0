"""Spectral densities from Lanczos tridiagonals (google/spectral-density conventions).

The convention, written down once
---------------------------------
For a symmetric ``A`` of size ``n`` with eigenpairs ``(lambda_j, u_j)`` and a unit start
vector ``v``, the spectral measure seen from ``v`` is ``mu_v = sum_j (u_j . v)^2 delta(lambda_j)``.
For a random ``v`` its expectation is the empirical eigenvalue distribution
``(1/n) sum_j delta(lambda_j)``. After ``m`` Lanczos steps from ``v``, the ``m``-point Gauss
quadrature rule for ``mu_v`` has

* **nodes** ``theta_k``: the eigenvalues of the tridiagonal ``T`` (ascending), and
* **weights** ``w_k = (s_k[0])^2``: the squared first components of ``T``'s eigenvectors
  (they sum to one),

and it integrates every polynomial of degree ``< 2m`` exactly:
``sum_k w_k theta_k^p = v^T A^p v``.

The density on a grid ``g_1 < ... < g_L`` averages the rules of the draws (probes) and
smooths each node with a Gaussian kernel,

    phi(t) = mean over draws of sum_k w_k N(t; theta_k, s^2),
    s^2 = sigma_squared * max(1, lambda_max - lambda_min),

then normalises it so that ``sum_j phi(g_j) * dg = 1`` (it integrates to one on its grid).
``lambda_min``/``lambda_max`` are the grid's ends: the extreme nodes widened by
``grid_expand`` on each side (so the range in the kernel variance includes
``2 * grid_expand``, as in the original package), with ``grid_len`` points; with an explicit
``grids`` they are its first and last points. ``sigma_squared`` defaults to ``1e-5``; the
original package advises values between ``1e-5`` and ``1e-1``.

Other tools' kernels, and how to match them
-------------------------------------------
Every tool smooths with a Gaussian; they differ in how its width is set. With ``R`` the
span of a tool's grid and ``m`` the Lanczos steps per probe, the kernel variance ``s^2`` is

* google/spectral-density (the original): ``sigma_squared * max(1, R)``, with the grid from
  the mean over probes of each probe's extreme node, widened by ``grid_expand``;
* PyHessian (``density_generate``): the same formula and default ``sigma_squared=1e-5``,
  with the grid widened by an absolute ``overhead`` (``0.01``);
* curvlinops (Papyan 2020, ``lanczos_approximate_spectrum``): the spectrum is mapped to
  ``[-1, 1]`` after widening ``[lo, hi]`` by ``margin`` (``0.05``) on each side, and the
  kernel's standard deviation there is ``2 / (m - 1) / sqrt(8 ln kappa)`` (``kappa=3``), so
  ``s = (hi - lo) (1 + 2 margin) / ((m - 1) sqrt(8 ln kappa))`` in eigenvalue units;
* hessian-eigenthings (``spectral_density``): standard deviation ``sigma``, by default
  ``(max node - min node) / m``.

:func:`kernel_variance` computes ``s^2`` for each convention from the nodes, and
:func:`matching_sigma_squared` the ``sigma_squared`` that makes :func:`eigv_to_density`
smooth with that same kernel (``s^2 / max(1, R)`` with ``R`` this module's grid span), so
that a density computed here can be laid over another tool's figure.

Differences from the original package (its faults, fixed here)
--------------------------------------------------------------
* Grid ends are the extreme nodes over all draws (not the mean of per-draw extremes, which
  left some nodes outside the grid); nodes with zero weight (Lanczos padding after a
  breakdown) do not stretch the grid.
* With an explicit ``grids``, the kernel width is set from the grid's span, so densities
  plotted on one shared grid share one bandwidth.
* When the kernel is narrower than the grid spacing (spectral ranges above about 1000 with
  the default ``sigma_squared``), point evaluation would drop spikes between grid points;
  there each node's Gaussian mass is integrated over the grid cells instead, so no mass is
  lost. When the kernel is wider than the spacing the original point formula is used as is.
* Every element is checked for NaN (not just one), and there is no Python loop over grid
  points.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy.special import ndtr  # standard normal CDF; scipy comes with jax

from .validate import count

__all__ = [
    "LogDensity",
    "log_abs_density",
    "eigv_to_density",
    "kernel_variance",
    "matching_sigma_squared",
    "tridiag_to_density",
    "tridiag_to_eigv",
]

CONVENTIONS = ("spectral_density", "pyhessian", "curvlinops", "eigenthings")


def tridiag_to_eigv(tridiag_list) -> tuple[np.ndarray, np.ndarray]:
    """Gauss quadrature nodes and weights of each tridiagonal.

    Parameters
    ----------
    tridiag_list:
        ``(num_draws, m, m)`` array or list of ``(m, m)`` tridiagonals (one ``(m, m)``
        matrix is taken as one draw).

    Returns
    -------
    (eig_vals, all_weights):
        Both ``(num_draws, m)`` float64: ascending eigenvalues of each ``T`` and the squared
        first components of its eigenvectors (each row sums to one).
    """
    tridiags = np.asarray(tridiag_list, dtype=np.float64)
    if tridiags.ndim == 2:
        tridiags = tridiags[None]
    if tridiags.ndim != 3 or tridiags.shape[1] != tridiags.shape[2]:
        raise ValueError(
            f"expected tridiagonals of shape (num_draws, m, m) or (m, m), got {tridiags.shape}."
        )
    if not np.all(np.isfinite(tridiags)):
        raise ValueError("the tridiagonals contain NaN or Inf; the Lanczos run failed.")
    eig_vals, eig_vecs = np.linalg.eigh(tridiags)
    return eig_vals, eig_vecs[:, 0, :] ** 2


def eigv_to_density(
    eig_vals,
    all_weights=None,
    grids=None,
    grid_len: int = 10000,
    sigma_squared: float | None = None,
    grid_expand: float = 1e-2,
) -> tuple[np.ndarray, np.ndarray]:
    """Smooth quadrature nodes and weights into a density on a grid.

    Parameters
    ----------
    eig_vals:
        ``(num_draws, m)`` nodes (a 1-D array is one draw).
    all_weights:
        ``(num_draws, m)`` weights; ``None`` gives each node weight ``1/m``.
    grids:
        Explicit increasing grid; by default ``grid_len`` points spanning the nodes.
    grid_len:
        Number of grid points when ``grids`` is not given.
    sigma_squared:
        Relative kernel variance (default ``1e-5``); see the module docstring.
    grid_expand:
        Margin added beyond the extreme nodes.

    Returns
    -------
    (density, grids):
        Both ``(grid_len,)`` float64; ``density >= 0`` and
        ``sum(density * spacing) == 1``.

    Raises
    ------
    ValueError
        NaN or Inf anywhere in the nodes or weights; mismatched shapes; a grid with fewer
        than two points or not increasing; no node with positive weight.
    """
    nodes, weights = _checked_draws(eig_vals, all_weights)
    if sigma_squared is None:
        sigma_squared = 1e-5
    if not sigma_squared > 0:
        raise ValueError(f"sigma_squared must be positive, got {sigma_squared}.")
    grids, lambda_min, lambda_max = _density_grid(nodes, weights, grids, grid_len, grid_expand)
    variance = sigma_squared * max(1.0, lambda_max - lambda_min)
    # Cell widths (uniform grids: the spacing everywhere, as in the original package).
    widths = np.gradient(grids)
    density = _kernel_sum(nodes, weights, grids, widths, variance)
    density /= nodes.shape[0]
    total = float(np.sum(density * widths))
    if total <= 0:
        raise ValueError("the density vanishes on the grid; the grid misses every node.")
    return density / total, grids


def _checked_draws(eig_vals, all_weights) -> tuple[np.ndarray, np.ndarray]:
    """``(num_draws, m)`` float64 nodes and weights (``1/m`` each when ``all_weights`` is
    ``None``), refused when their shapes differ or any element is NaN or Inf."""
    nodes = np.asarray(eig_vals, dtype=np.float64)
    if nodes.ndim == 1:
        nodes = nodes[None]
    if nodes.ndim != 2:
        raise ValueError(f"eig_vals must be (num_draws, m), got shape {nodes.shape}.")
    if all_weights is None:
        weights = np.full_like(nodes, 1.0 / nodes.shape[1])
    else:
        weights = np.asarray(all_weights, dtype=np.float64)
        if weights.ndim == 1:
            weights = weights[None]
        if weights.shape != nodes.shape:
            raise ValueError(
                f"all_weights has shape {weights.shape} but eig_vals has shape {nodes.shape}."
            )
    if not (np.all(np.isfinite(nodes)) and np.all(np.isfinite(weights))):
        raise ValueError("eig_vals or all_weights contain NaN or Inf.")
    return nodes, weights


def _density_grid(
    nodes: np.ndarray, weights: np.ndarray, grids, grid_len: int, grid_expand: float
) -> tuple[np.ndarray, float, float]:
    """``(grids, lambda_min, lambda_max)``: the explicit ``grids`` (checked) and its ends,
    or ``grid_len`` points spanning the nodes with positive weight, widened by
    ``grid_expand`` on each side (zero-weight padding must not stretch the grid)."""
    if grids is None:
        used = nodes[weights > 0]
        if used.size == 0:
            raise ValueError("no node has positive weight; there is no density to draw.")
        lambda_max = float(used.max()) + grid_expand
        lambda_min = float(used.min()) - grid_expand
        grid_len = count("grid_len", grid_len, 2)
        return np.linspace(lambda_min, lambda_max, num=int(grid_len)), lambda_min, lambda_max
    grids = np.asarray(grids, dtype=np.float64)
    if grids.ndim != 1 or grids.size < 2 or not np.all(np.diff(grids) > 0):
        raise ValueError("grids must be an increasing 1-D array of at least two points.")
    return grids, float(grids[0]), float(grids[-1])


def _kernel_sum(
    nodes: np.ndarray, weights: np.ndarray, grids: np.ndarray, widths: np.ndarray, variance: float
) -> np.ndarray:
    """The sum over draws of each draw's weighted Gaussians (of ``variance``) on the grid:
    evaluated at the grid points when the kernel is at least as wide as every cell, else
    each Gaussian's mass in each cell divided by its width, so that no spike narrower than
    the spacing falls between grid points and is lost."""
    sigma = math.sqrt(variance)
    density = np.zeros_like(grids)
    if sigma >= widths.max():
        norm = 1.0 / math.sqrt(2.0 * math.pi * variance)
        for draw_nodes, draw_weights in _weighted(nodes, weights):
            z = (grids[None, :] - draw_nodes[:, None]) / sigma
            density += draw_weights @ (norm * np.exp(-0.5 * z**2))
        return density
    # Kernel narrower than the grid: integrate each Gaussian over the grid cells.
    edges = np.concatenate(
        ([grids[0] - widths[0] / 2], (grids[1:] + grids[:-1]) / 2, [grids[-1] + widths[-1] / 2])
    )
    for draw_nodes, draw_weights in _weighted(nodes, weights):
        cdf = ndtr((edges[None, :] - draw_nodes[:, None]) / sigma)
        density += draw_weights @ (np.diff(cdf, axis=1) / widths[None, :])
    return density


def _weighted(nodes: np.ndarray, weights: np.ndarray):
    """Each draw's nodes and weights without its zero-weight nodes (breakdown padding,
    which adds nothing but the cost of its kernels)."""
    for draw_nodes, draw_weights in zip(nodes, weights, strict=True):
        keep = draw_weights != 0
        yield draw_nodes[keep], draw_weights[keep]


def tridiag_to_density(
    tridiag_list, sigma_squared: float = 1e-5, grid_len: int = 10000
) -> tuple[np.ndarray, np.ndarray]:
    """Density on a grid from Lanczos tridiagonals: :func:`tridiag_to_eigv` then
    :func:`eigv_to_density` with each draw's quadrature weights.

    Returns ``(density, grids)``, both ``(grid_len,)`` float64.
    """
    eig_vals, all_weights = tridiag_to_eigv(tridiag_list)
    return eigv_to_density(eig_vals, all_weights, grid_len=grid_len, sigma_squared=sigma_squared)


def _nodes_weights(eig_vals, all_weights) -> tuple[np.ndarray, np.ndarray]:
    nodes = np.atleast_2d(np.asarray(eig_vals, dtype=np.float64))
    if all_weights is None:
        return nodes, np.full_like(nodes, 1.0 / nodes.shape[1])
    weights = np.atleast_2d(np.asarray(all_weights, dtype=np.float64))
    if weights.shape != nodes.shape:
        raise ValueError(f"all_weights has shape {weights.shape} but eig_vals {nodes.shape}.")
    return nodes, weights


def kernel_variance(
    convention: str,
    eig_vals,
    all_weights=None,
    *,
    sigma_squared: float = 1e-5,
    grid_expand: float = 1e-2,
    overhead: float = 0.01,
    kappa: float = 3.0,
    margin: float = 0.05,
    sigma: float | None = None,
) -> float:
    """The variance ``s^2`` (in eigenvalue units) of the Gaussian kernel that another tool
    would use for these ``(num_draws, m)`` nodes; see the module docstring.

    ``convention`` is ``"spectral_density"`` (the original package; ``sigma_squared``,
    ``grid_expand``), ``"pyhessian"`` (``sigma_squared``, ``overhead``), ``"curvlinops"``
    (``kappa``, ``margin``; the spectral bounds are the extreme nodes with positive weight)
    or ``"eigenthings"`` (``sigma``, the standard deviation, or its default).
    """
    nodes, weights = _nodes_weights(eig_vals, all_weights)
    m = nodes.shape[1]
    valid = weights > 0  # zero weight: padding after a Lanczos breakdown, not a node
    used = nodes[valid]
    if used.size == 0 or not np.all(valid.any(axis=1)):
        raise ValueError("every draw needs a node with positive weight.")
    if convention in ("spectral_density", "pyhessian"):
        pad = grid_expand if convention == "spectral_density" else overhead
        highs = np.where(valid, nodes, -np.inf).max(axis=1)
        lows = np.where(valid, nodes, np.inf).min(axis=1)
        span = float(np.mean(highs) - np.mean(lows)) + 2 * pad
        return sigma_squared * max(1.0, span)
    if convention == "curvlinops":
        if m < 2 or not kappa > 1:
            raise ValueError("curvlinops' kernel needs m >= 2 Lanczos nodes and kappa > 1.")
        width = (float(used.max()) - float(used.min())) * (1 + 2 * margin)
        return (width / ((m - 1) * math.sqrt(8 * math.log(kappa)))) ** 2
    if convention == "eigenthings":
        if sigma is None:
            sigma = (float(used.max()) - float(used.min())) / m
        return float(sigma) ** 2
    raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}.")


def matching_sigma_squared(
    convention: str,
    eig_vals,
    all_weights=None,
    *,
    grids=None,
    grid_expand: float = 1e-2,
    **settings,
) -> float:
    """``sigma_squared`` for :func:`eigv_to_density` (same nodes, ``grids`` and
    ``grid_expand``) that gives the kernel of ``convention``; ``settings`` are that tool's
    parameters, as for :func:`kernel_variance`.

    >>> nodes = np.array([[0.0, 1.0, 40.0]])
    >>> s2 = matching_sigma_squared("curvlinops", nodes, kappa=3.0)
    >>> density, grid = eigv_to_density(nodes, sigma_squared=s2)
    """
    variance = kernel_variance(
        convention, eig_vals, all_weights, grid_expand=grid_expand, **settings
    )
    nodes, weights = _nodes_weights(eig_vals, all_weights)
    if grids is not None:
        span = float(grids[-1]) - float(grids[0])
    else:
        used = nodes[weights > 0]
        span = float(used.max()) - float(used.min()) + 2 * grid_expand
    return variance / max(1.0, span)


class LogDensity(NamedTuple):
    """A density of ``log10 |lambda|``, split by sign (see :func:`log_abs_density`)."""

    grid: np.ndarray  # (grid_len,): log10 |lambda|
    positive: np.ndarray  # (grid_len,): density of log10(lambda) over lambda > floor
    negative: np.ndarray  # (grid_len,): density of log10(-lambda) over lambda < -floor
    zero_mass: float  # the weight of |lambda| <= floor, which a log axis cannot show
    floor: float


def log_abs_density(
    eig_vals,
    all_weights=None,
    *,
    grid_len: int = 1000,
    sigma: float = 0.05,
    floor: float | None = None,
    grids=None,
) -> LogDensity:
    """The density of ``log10 |lambda|``, positive and negative eigenvalues apart: the
    view that shows a bulk spread over decades and its small negative part next to the
    outliers (Papyan 2019; Ghorbani et al. 2019, figure 4).

    Each node ``lambda`` of weight ``w`` adds a Gaussian of width ``sigma`` (in decades)
    at ``log10 |lambda|`` to the positive or the negative part. The two parts together
    integrate (over ``log10 |lambda|``) to one less ``zero_mass``, the weight of the nodes
    with ``|lambda| <= floor`` (default: ``1e-6`` of the largest ``|lambda|``).
    ``eig_vals``, ``all_weights``: as for :func:`eigv_to_density` (``(num_draws, m)``;
    SLQ's ``result.nodes, result.weights``); the draws are averaged. ``grids``: explicit
    ``log10 |lambda|`` points; by default ``grid_len`` points from three widths below
    ``log10 floor`` to three widths past the largest node.
    """
    nodes, weights = _checked_draws(eig_vals, all_weights)
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}.")
    totals = weights.sum(axis=1, keepdims=True)
    used = totals[:, 0] > 0  # a draw without weight (a probe that broke down at once) is left out
    nodes, weights = nodes[used], weights[used] / totals[used]
    largest = float(np.max(np.abs(nodes[weights > 0]))) if np.any(weights > 0) else 0.0
    if largest == 0.0:
        raise ValueError("every node with weight is zero; there is no log density to draw.")
    floor = 1e-6 * largest if floor is None else float(floor)
    if not floor > 0:
        raise ValueError(f"floor must be positive, got {floor}.")
    if grids is None:
        low, high = np.log10(floor) - 3 * sigma, np.log10(largest) + 3 * sigma
        grids = np.linspace(low, high, count("grid_len", grid_len, 2))
    grids = np.asarray(grids, np.float64)
    if grids.ndim != 1 or grids.size < 2 or not np.all(np.diff(grids) > 0):
        raise ValueError("grids must be an increasing 1-D array of at least two points.")
    widths = np.gradient(grids)
    num = nodes.shape[0]
    parts = []
    for sign in (1.0, -1.0):
        keep = sign * nodes > floor
        logs = np.log10(np.where(keep, sign * nodes, 1.0))
        density = _kernel_sum(logs, np.where(keep, weights, 0.0), grids, widths, sigma**2)
        parts.append(density / num)
    zero = float(np.sum(np.where(np.abs(nodes) <= floor, weights, 0.0)) / num)
    return LogDensity(grids, parts[0], parts[1], zero, floor)
