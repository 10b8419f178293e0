"""The paper's analyses of a spectrum: its outliers, and the gradient's share among them.

Ghorbani, Krishnan and Xiao (2019) measure, through training, the share of the gradient's
squared norm in the span of the Hessian's top ``k`` eigenvectors (the outliers): most of
it, soon after training starts. :func:`gradient_share` computes
``||P_k g||^2 / ||g||^2`` for ``k = 1 .. K``, for the full-batch gradient and, on request,
for each mini-batch gradient, with the Ritz pairs' residuals carried along so that an
unconverged pair is visible next to the share it contributes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from .density import _checked_draws, _weighted
from .linop import flat_rows, nested_basis

__all__ = ["GradientShare", "Outliers", "gradient_share", "outliers"]


class GradientShare(NamedTuple):
    """The gradient's share in the top ``k`` eigenspaces, ``k = 1 .. K``."""

    share: np.ndarray  # (K,): ||P_k g||^2 / ||g||^2 of the full-batch gradient
    batch_share: np.ndarray | None  # (num_batches, K): the same for each mini-batch gradient
    eigenvalues: np.ndarray  # (K,): the Ritz values, in the order given (most extreme first)
    residuals: np.ndarray  # (K,): their residuals |A u - theta u| (NaN when not given)
    gradient_norm: float  # ||g|| of the full-batch gradient


def _shares(q: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """``(n, K)`` cumulative shares of each row of ``gradients`` in ``q``'s first columns."""
    coefficients = gradients @ q  # (n, K)
    norms = np.sum(gradients**2, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, np.cumsum(coefficients**2, axis=1) / norms, np.nan)


def gradient_share(
    operator: Any, eigenpairs: Any, *, gradient: Any = None, per_batch: bool = False
) -> GradientShare:
    """The share of the gradient's squared norm in the span of the top ``k`` eigenvectors.

    Parameters
    ----------
    operator:
        A curvature operator (:func:`jax_spectral.hessian_operator`, ``ggn_operator``,
        ``fisher_operator``): its ``gradient()`` is the full-batch gradient of the loss it
        is the curvature of, and ``gradient(per_batch=True)`` the mini-batch gradients.
    eigenpairs:
        :func:`jax_spectral.eigenpairs`' result (its vectors flat or params-shaped), or
        ``(k, dim)`` rows of eigenvectors, most extreme first; the ``k``-th share uses
        the first ``k``. The vectors need not be exactly orthonormal: the span of the
        first ``k`` is what counts.
    gradient:
        A gradient to use instead of the operator's: flat ``(dim,)``, or params-shaped for
        an operator with ``ravel`` (then ``operator`` may be any operator with ``dim``).
    per_batch:
        Also the shares of each mini-batch gradient (``batch_share``).

    Returns
    -------
    GradientShare
        ``share[k - 1] = ||P_k g||^2 / ||g||^2``, non-decreasing in ``k`` and at most 1;
        NaN for a zero gradient.
    """
    vectors = flat_rows(operator, eigenpairs, "eigenvectors")
    dim = int(operator.dim)
    values = getattr(eigenpairs, "values", None)
    residuals = getattr(eigenpairs, "residuals", None)
    k = vectors.shape[0]
    values = np.full(k, np.nan) if values is None else np.asarray(values, np.float64)
    residuals = np.full(k, np.nan) if residuals is None else np.asarray(residuals, np.float64)
    if gradient is None:
        if not hasattr(operator, "gradient"):
            raise TypeError(
                "this operator has no gradient(); pass gradient= (a flat (dim,) vector)."
            )
        g = np.asarray(operator.gradient(), np.float64)
    else:
        if not isinstance(gradient, (np.ndarray, jax.Array)) and hasattr(operator, "ravel"):
            gradient = operator.ravel(gradient)  # params-shaped
        g = np.asarray(gradient, np.float64).reshape(-1)
        if g.shape != (dim,):
            raise ValueError(f"gradient must have shape ({dim},), got {g.shape}.")
    if not np.all(np.isfinite(g)):
        raise ValueError("the gradient contains NaN or Inf.")
    q = nested_basis(vectors, "eigenvectors")
    batch_share = None
    if per_batch:
        if not hasattr(operator, "gradient"):
            raise TypeError("per_batch=True needs a curvature operator (its gradient()).")
        batch_share = _shares(q, np.asarray(operator.gradient(per_batch=True), np.float64))
    return GradientShare(
        share=_shares(q, g[None])[0],
        batch_share=batch_share,
        eigenvalues=values,
        residuals=residuals,
        gradient_norm=float(np.linalg.norm(g)),
    )


class Outliers(NamedTuple):
    """Eigenvalues separated from the bulk by a gap (:func:`outliers`)."""

    upper: np.ndarray  # (k,): the outliers above the bulk, largest first
    lower: np.ndarray  # (j,): those below it, smallest first
    bulk: tuple[float, float]  # the bulk's extreme eigenvalues (its lowest and highest)
    center: float  # the spectrum's median, from which the bulk's extent is measured
    upper_ratios: np.ndarray  # ratio of each gap below the r-th largest value, r = 1, 2, ..
    lower_ratios: np.ndarray  # the same above the r-th smallest value

    @property
    def values(self) -> np.ndarray:
        """All outliers, the upper ones first."""
        return np.concatenate([self.upper, self.lower])


def _merged(nodes: np.ndarray, weights: np.ndarray, tol: float):
    """One probe's nodes in descending order with copies closer than ``tol`` merged into
    the heaviest (a breakdown leaves near-copies of converged values with tiny weights)."""
    order = np.argsort(-nodes, kind="stable")
    nodes, weights = nodes[order], weights[order]
    out_nodes, out_weights = [nodes[0]], [weights[0]]
    heaviest = weights[0]
    for node, weight in zip(nodes[1:], weights[1:], strict=True):
        if out_nodes[-1] - node <= tol:
            if weight > heaviest:
                out_nodes[-1], heaviest = node, weight
            out_weights[-1] += weight
        else:
            out_nodes.append(node)
            out_weights.append(weight)
            heaviest = weight
    return np.array(out_nodes), np.array(out_weights)


def _ranked(spectrum: Any, tol: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Each probe's distinct nodes in descending order and their weights,
    ``(probes, count)``, ``count`` the fewest of any probe (a probe with more loses some
    from the middle), and the spectrum's width."""
    if isinstance(spectrum, dict):
        nodes, weights = spectrum.get("nodes"), spectrum.get("weights")
    else:
        nodes, weights = getattr(spectrum, "nodes", None), getattr(spectrum, "weights", None)
    if nodes is None or weights is None:
        raise TypeError(
            "spectrum must be an SLQ result or a training record (nodes and weights of "
            f"several probes), got {type(spectrum).__name__}."
        )
    nodes, weights = _checked_draws(nodes, weights)  # (probes, order), finite
    if nodes.shape[0] < 2:
        raise ValueError(
            "outliers need at least two probes: an outlier is a Ritz value that every probe "
            "finds (run slq with num_probes >= 2)."
        )
    if np.any(weights < 0) or not np.allclose(weights.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError(
            "each probe's weights must be non-negative and sum to one (a quadrature rule); "
            "are nodes and weights (probes, order), not transposed?"
        )
    width = float(np.ptp(nodes[weights > 0])) or 1.0
    rows = [_merged(n, w, tol * width) for n, w in _weighted(nodes, weights)]
    count = min(len(n) for n, _ in rows)
    if count < 2:
        raise ValueError("outliers need at least two distinct nodes in every probe.")
    top = (count + 1) // 2
    pick = lambda row: np.r_[row[:top], row[len(row) - (count - top) :]]  # noqa: E731
    return np.array([pick(n) for n, _ in rows]), np.array([pick(w) for _, w in rows]), width


def _side(values, resolved, mass, *, min_gap, min_spacing, max_fraction, window=5):
    """How many of ``values`` (descending ranks, measured from the median) lie above the
    deepest qualifying gap, and each rank's ratio of gap to extent (NaN where no boundary
    is sought)."""
    ratios = np.full(len(values) - 1, np.nan)
    chosen = 0
    for k in range(1, len(values)):
        if not resolved[k - 1] or mass[k - 1] > max_fraction:
            break  # c_k unresolved (the bulk, as probes see it) or too heavy for an outlier
        gap, extent = values[k - 1] - values[k], values[k]
        ratios[k - 1] = gap / extent if extent > 0 else (np.inf if gap > 0 else 0.0)
        rest = values[k : k + window + 1]
        below = -np.diff(rest[rest >= 0])  # the spacing of what remains, on this side
        spacing = float(np.median(below)) if below.size else 0.0
        if ratios[k - 1] >= min_gap and gap >= min_spacing * spacing:
            chosen = k  # the deepest qualifying gap: nested outliers all count
        if extent <= 0:
            break  # the median reached
    return chosen, ratios


def _resolved(nodes: np.ndarray, tol: float) -> np.ndarray:
    """Whether the probes agree on each rank's value: its spread over probes (the
    interquartile range, so that a minority of probes does not count) is below ``tol``
    and a tenth of the gaps to the neighbouring ranks' values."""
    values = np.median(nodes, axis=0)
    spread = np.percentile(nodes, 75, axis=0) - np.percentile(nodes, 25, axis=0)
    gaps = np.abs(np.diff(values))
    nearest = np.minimum(np.r_[np.inf, gaps], np.r_[gaps, np.inf])
    return (spread <= tol) & (spread <= 0.1 * nearest)


def _weighted_median(nodes: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(nodes, kind="stable")
    cumulative = np.cumsum(weights[order])
    return float(nodes[order][np.searchsorted(cumulative, 0.5 * cumulative[-1])])


def outliers(
    spectrum: Any,
    *,
    min_gap: float = 0.5,
    min_spacing: float = 4.0,
    tol: float = 1e-4,
    max_fraction: float = 0.1,
) -> Outliers:
    """The eigenvalues isolated from the bulk of the spectrum, above and below it.

    Lanczos resolves isolated eigenvalues first, so every SLQ probe finds the outliers at
    the same Ritz values, while each probe samples the bulk at different nodes. With
    ``c_1 > c_2 > ...`` the top Ritz values (the median over probes at each rank) and
    ``m`` the spectrum's median, ``c_1 .. c_k`` are outliers when the probes agree on them
    (they are resolved) and the gap below them is wide twice over: against the distance
    of what remains from the median, ``(c_k - c_{k+1}) / (c_{k+1} - m) >= min_gap``, and
    against the spacing of what remains, ``c_k - c_{k+1} >= min_spacing`` times the median
    of the next five gaps below on the same side of the median. The first keeps a smoothly
    decaying tail (an exponential one, whose top gaps are wide against their neighbours)
    from counting; the second keeps the values near a bulk that is dense at the median from
    counting. The deepest such ``k`` is taken, so large outliers above a group of smaller
    ones all count; the same rule, mirrored, finds outliers below the bulk.

    It is a heuristic with thresholds, not a test: ``upper_ratios`` and ``lower_ratios``
    hold the first ratio at each rank where a boundary was sought, to show how clear the
    separation is. What a probe resolves grows with ``order``: a group of more outliers
    than the probes resolve stays in the bulk, whose reported edge ``bulk[1]`` then lies
    far above its body (run a larger ``order``).

    Parameters
    ----------
    spectrum:
        :func:`jax_spectral.slq`'s result with at least two probes, or a record of
        :func:`jax_spectral.training.record` (any object or dict with ``nodes`` and
        ``weights`` of shape ``(probes, order)``).
    min_gap:
        The smallest ratio of the gap to the distance of what remains from the median.
    min_spacing:
        The smallest ratio of the gap to the spacing of the values below it.
    tol:
        A Ritz value is resolved when the probes' values at its rank differ by at most
        ``tol`` times the spectrum's width and a tenth of the gaps to its neighbours (the
        interquartile range over probes, so that a minority of probes does not count).
        Nodes of one probe closer than ``tol`` times the width are one node.
    max_fraction:
        Outliers are a small part of the spectrum: a boundary is sought only among the
        extreme values whose quadrature weight (the mean over probes) sums to at most this.

    Returns
    -------
    Outliers
        ``upper`` (largest first) and ``lower`` (smallest first), the ``bulk``'s two
        extreme eigenvalues as the Ritz values see them, the median, and the ratios.
        A repeated outlier appears once: Lanczos from one vector sees one copy of it (and
        near-copies that a breakdown leaves are merged).
    """
    if not np.isfinite(min_gap) or min_gap <= 0:
        raise ValueError(f"min_gap must be positive and finite, got {min_gap}.")
    if not np.isfinite(min_spacing) or min_spacing < 0:
        raise ValueError(f"min_spacing must be non-negative and finite, got {min_spacing}.")
    if not np.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be non-negative and finite, got {tol}.")
    if not 0 < max_fraction <= 1:
        raise ValueError(f"max_fraction must be in (0, 1], got {max_fraction}.")
    nodes, weights, width = _ranked(spectrum, tol)
    center = _weighted_median(nodes.ravel(), weights.ravel())
    settings = {"min_gap": min_gap, "min_spacing": min_spacing, "max_fraction": max_fraction}
    k_up, upper_ratios = _side(
        np.median(nodes, axis=0) - center,
        _resolved(nodes, tol * width),
        np.mean(np.cumsum(weights, axis=1), axis=0),
        **settings,
    )
    k_down, lower_ratios = _side(
        center - np.median(nodes[:, ::-1], axis=0),
        _resolved(nodes[:, ::-1], tol * width),
        np.mean(np.cumsum(weights[:, ::-1], axis=1), axis=0),
        **settings,
    )
    top, bottom = np.median(nodes, axis=0), np.median(nodes[:, ::-1], axis=0)
    return Outliers(
        upper=top[:k_up],
        lower=bottom[:k_down],
        bulk=(float(bottom[k_down]), float(top[k_up])),
        center=center,
        upper_ratios=upper_ratios,
        lower_ratios=lower_ratios,
    )
