"""Stochastic trace estimators: Hutchinson and Hutch++, with standard errors.

Hutchinson: for Rademacher probes ``z`` (entries +-1), ``E[z^T A z] = tr(A)``; the estimate
is the mean of ``n`` such samples and its standard error the samples' standard deviation
over ``sqrt(n)``. For a diagonal ``A`` every sample equals the trace exactly.

Hutch++ (Meyer, Musco, Musco, Woodruff, SOSA 2021): with ``m`` products, a third of them
sketch the range, ``Q = orth(A S)``; the trace of ``A`` on that subspace,
``tr(Q^T A Q)``, is computed exactly (a second third), and Hutchinson with the last third
estimates the trace of the deflated ``(I - Q Q^T) A (I - Q Q^T)``. For matrices whose
spectrum is dominated by a few large eigenvalues, such as neural-network Hessians, its error
is far below Hutchinson's at the same cost. The standard error is that of the deflated part.

Every estimator takes a required ``key``. Products are computed in chunks of up to
``chunk`` vectors: one ``operator.matmat`` call per chunk for an operator (one pass over
the data serves the whole chunk), ``jax.vmap`` for a plain function. ``progress`` is as
for :func:`jax_spectral.lanczos`, counted in products.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .lanczos import NonFiniteError, flat_matvec, resolve
from .linop import is_operator, matmat
from .progress import Progress, ProgressArg
from .validate import count

__all__ = ["TraceEstimate", "hutchinson", "hutchpp"]


class TraceEstimate(NamedTuple):
    """A trace estimate (float64 host numbers)."""

    estimate: float  # the estimated trace
    stderr: float  # standard error of the estimate (0 when every sample agrees)
    num_matvecs: int  # products of the operator used
    samples: np.ndarray  # shape=(n,); the Hutchinson samples (deflated part for Hutch++)


def _resolve(matvec: Callable | Any, dim: int | None, like: Any) -> tuple[Callable, int, Any, Any]:
    """``(fn, dim, dtype, operator)`` from :func:`jax_spectral.lanczos.resolve`, the one
    recogniser of operators and functions; ``operator`` is ``None`` for a function."""
    problem = resolve(matvec, dim=dim, like=like)
    operand = problem.args[0]
    operator = operand if is_operator(operand) else None
    return flat_matvec(problem.fn, *problem.args), problem.dim, problem.dtype, operator


def products(
    fn: Callable, vectors: jax.Array, operator: Any = None, *, chunk: int = 10, bar=None
) -> np.ndarray:
    """``A v`` for each row ``v`` of ``vectors`` as float64 on the host, in chunks of
    ``chunk`` rows (``operator.matmat`` when the operator has it, else ``vmap`` of ``fn``
    for traceable operators and functions, else one product at a time). Raises
    ``FloatingPointError`` on NaN or Inf."""
    out = []
    for start in range(0, vectors.shape[0], chunk):
        part = vectors[start : start + chunk]
        done = jax.vmap(fn)(part) if operator is None else matmat(operator, part)
        out.append(np.asarray(done, np.float64))
        if bar is not None:
            bar.update(part.shape[0])
    result = np.concatenate(out)
    if not np.all(np.isfinite(result)):
        raise NonFiniteError("a matrix-vector product contained NaN or Inf.")
    return result


def _rademacher(key: jax.Array, shape: tuple[int, int], dtype) -> jax.Array:
    return jax.random.rademacher(key, shape, dtype=dtype)


def _estimate(samples: np.ndarray, offset: float, num_matvecs: int) -> TraceEstimate:
    n = samples.shape[0]
    stderr = float(np.std(samples, ddof=1) / np.sqrt(n)) if n > 1 else float("inf")
    return TraceEstimate(offset + float(np.mean(samples)), stderr, num_matvecs, samples)


def hutchinson(
    matvec: Callable | Any,
    key: jax.Array,
    num_probes: int,
    *,
    dim: int | None = None,
    like: Any = None,
    chunk: int = 10,
    progress: ProgressArg = False,
) -> TraceEstimate:
    """Hutchinson's estimate of ``tr(A)`` from ``num_probes`` Rademacher probes.

    ``matvec``, ``dim`` and ``like`` are as for :func:`jax_spectral.lanczos`: an operator
    such as :func:`jax_spectral.hessian_operator`'s, a function on flat ``(dim,)`` vectors
    (give ``dim``) or on params-shaped pytrees (give ``like=params``). The standard error
    needs two probes or more (it is ``inf`` for one).

    Raises ``ValueError`` for ``num_probes < 1`` or a missing ``dim``, ``FloatingPointError``
    for a non-finite product.
    """
    num_probes = count("num_probes", num_probes, 1)
    chunk = count("chunk", chunk, 1)
    fn, dim, dtype, operator = _resolve(matvec, dim, like)
    probes = _rademacher(key, (num_probes, dim), jnp.promote_types(dtype, jnp.float32))
    with Progress(progress, num_probes, "hutchinson", unit="product") as bar:
        applied = products(fn, probes, operator, chunk=chunk, bar=bar)
    samples = np.einsum("ij,ij->i", np.asarray(probes, np.float64), applied)
    return _estimate(samples, 0.0, num_probes)


def hutchpp(
    matvec: Callable | Any,
    key: jax.Array,
    num_matvecs: int,
    *,
    dim: int | None = None,
    like: Any = None,
    chunk: int = 10,
    progress: ProgressArg = False,
) -> TraceEstimate:
    """Hutch++ estimate of ``tr(A)`` from ``num_matvecs`` products (at least 6; a third of
    them sketch the range, a third give its exact trace, a third probe the rest).
    ``matvec``, ``dim`` and ``like`` are as for :func:`hutchinson`.

    Raises ``ValueError`` for ``num_matvecs < 6`` or a missing ``dim``,
    ``FloatingPointError`` for a non-finite product.
    """
    num_matvecs = count("num_matvecs", num_matvecs, 6)
    chunk = count("chunk", chunk, 1)
    fn, dim, dtype, operator = _resolve(matvec, dim, like)
    k = num_matvecs // 3
    work = jnp.promote_types(dtype, jnp.float32)
    key_sketch, key_probe = jax.random.split(key)
    with Progress(progress, num_matvecs, "hutch++", unit="product") as bar:

        def apply(vectors):
            return products(fn, jnp.asarray(vectors, work), operator, chunk=chunk, bar=bar)

        sketch = _rademacher(key_sketch, (k, dim), work)
        q, _ = np.linalg.qr(apply(sketch).T)  # (dim, k), orthonormal columns
        low_rank = float(np.trace(q.T @ apply(q.T).T))
        g = np.asarray(_rademacher(key_probe, (num_matvecs - 2 * k, dim), work), np.float64)
        g = g - (g @ q) @ q.T  # probes deflated: (I - Q Q^T) g
        samples = np.einsum("ij,ij->i", g, apply(g))
    return _estimate(samples, low_rank, num_matvecs)
