"""The paper's analyses of a spectrum: how much of the gradient lies in the top eigenspace.

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

from .linop import flat_rows, nested_basis

__all__ = ["GradientShare", "gradient_share"]


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
