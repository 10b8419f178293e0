"""Extreme eigenpairs (Ritz pairs) of a symmetric operator, with measured residuals.

``eigenpairs(op, key, k)`` runs :func:`jax_spectral.lanczos` with full reorthogonalisation
and returns the ``k`` largest (or smallest, algebraically) Ritz values ``theta`` with their
Ritz vectors ``u``. Each residual ``|A u - theta u|`` is measured with one extra product per
vector (not taken from the Lanczos estimate), and a pair counts as converged when its
residual is at most ``tol`` times the largest ``|theta|`` (the scale of the spectrum). By
Weyl's bound an eigenvalue of ``A`` then lies within that residual of ``theta``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .lanczos import flat_matvec, lanczos, resolve, ritz
from .linop import dtype_of, is_operator
from .progress import ProgressArg
from .trace import products
from .validate import count

__all__ = ["Eigenpairs", "eigenpairs"]


class Eigenpairs(NamedTuple):
    """Extreme Ritz pairs; index 0 is the most extreme."""

    values: np.ndarray  # shape=(k,), float64
    vectors: Any  # shape=(k, dim) array, or a params-shaped pytree with a leading k axis
    residuals: np.ndarray  # shape=(k,), float64; |A u - theta u|, measured
    converged: np.ndarray  # shape=(k,), bool; residual <= tol * max |theta|
    num_steps: int  # Lanczos steps run (fewer than order after a breakdown)


def eigenpairs(
    matvec: Callable | Any,
    key: jax.Array,
    k: int,
    *,
    which: str = "largest",
    order: int | None = None,
    dim: int | None = None,
    like: Any = None,
    tol: float = 1e-4,
    progress: ProgressArg = False,
    loop: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
    basis_sharding: jax.sharding.Sharding | None = None,
    basis_memory: str = "device",
    recurrence_dtype: Any = None,
) -> Eigenpairs:
    """The ``k`` largest or smallest eigenpairs of a symmetric operator.

    Parameters
    ----------
    matvec, key, dim, like:
        As for :func:`jax_spectral.lanczos`. With an operator from
        :func:`jax_spectral.hessian_operator` the vectors come back params-shaped.
    k:
        Number of pairs.
    which:
        ``"largest"`` or ``"smallest"`` (algebraic: the most negative first).
    order:
        Lanczos steps; default ``min(dim, max(4 k, 80))``.
    tol:
        Relative residual below which a pair counts as converged.
    progress, loop, checkpoint, checkpoint_every, resume:
        As for :func:`jax_spectral.lanczos`, for the Lanczos run (a checkpointed run
        resumes its Lanczos steps; the residuals are recomputed).
    basis_sharding, basis_memory, recurrence_dtype:
        As for :func:`jax_spectral.lanczos`.

    Raises
    ------
    ValueError
        ``k < 1`` or more than the steps run, an unknown ``which``.
    FloatingPointError
        A product (in Lanczos or for a residual) was NaN or Inf.
    """
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}.")
    k = count("k", k)
    problem = resolve(matvec, dim=dim, like=like)
    operator = problem.args[0] if is_operator(problem.args[0]) else None
    if order is None:
        order = min(problem.dim, max(4 * int(k), 80))
    options = dict(loop=loop, checkpoint=checkpoint, checkpoint_every=checkpoint_every)
    options.update(resume=resume, basis_sharding=basis_sharding, basis_memory=basis_memory)
    options.update(recurrence_dtype=recurrence_dtype, progress=progress)
    result = lanczos(matvec, key, order, dim=dim, like=like, **options)
    if k > int(result.num_steps):
        raise ValueError(
            f"k={k} pairs asked for, but Lanczos found an invariant subspace after "
            f"{int(result.num_steps)} steps; ask for fewer pairs."
        )
    values, vectors = ritz(result)
    vectors = vectors[:, : problem.dim]  # without the padding of a sharded basis, if any
    scale = float(np.max(np.abs(values)))
    pick = np.argsort(values)[::-1][:k] if which == "largest" else np.argsort(values)[:k]
    values, vectors = values[pick], vectors[jnp.asarray(pick)]

    apply = flat_matvec(problem.fn, *problem.args)
    applied = products(apply, vectors, operator)  # one data pass per 10 vectors
    residuals = np.linalg.norm(applied - values[:, None] * np.asarray(vectors, np.float64), axis=1)
    converged = residuals <= tol * scale

    if is_operator(matvec) and hasattr(matvec, "unravel"):  # else flat vectors
        vectors = jax.vmap(matvec.unravel)(jnp.asarray(vectors, dtype_of(matvec)))
    elif like is not None:
        vectors = jax.vmap(jax.flatten_util.ravel_pytree(like)[1])(vectors)
    return Eigenpairs(values, vectors, residuals, converged, int(result.num_steps))
