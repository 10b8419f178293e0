"""Stochastic Lanczos quadrature: many probes in lockstep, one data pass per step for all.

``slq(op, key, num_probes=n, order=m)`` runs ``n`` Lanczos recurrences from independent
Gaussian start vectors. All probes advance together, so each pass over the data serves
every probe:

* for a traceable operator (in-memory data, ``loop="scan"``) the scanned Lanczos is
  ``jax.vmap``-ed over the probes' keys; inside, each batch's HVP is vmapped over the ``n``
  tangents;
* for a host-driven operator (streams, or convolutional models on CPU) a host loop calls
  ``operator.matmat`` once per step (each batch read once, its HVP vmapped over the probes)
  and a vmapped :func:`jax_spectral.lanczos.lanczos_step`.

Either way probe ``i`` gives the same tridiagonal as ``lanczos(op, keys[i], m)`` run alone,
with ``keys = jax.random.split(key, n)``.

:func:`spectral_density` turns the result into the mean density over probes on one grid,
with its standard error per grid point (the probes' spread over ``sqrt(n)``), using the
conventions of :mod:`jax_spectral.density`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .density import eigv_to_density, tridiag_to_eigv
from .lanczos import LanczosResult, _default_tol, init_state, lanczos, lanczos_step, pack_result

__all__ = ["SLQResult", "SpectralDensity", "slq", "spectral_density"]


class SLQResult(NamedTuple):
    """Per-probe Lanczos results and Gauss quadrature rules."""

    lanczos: LanczosResult  # every field with a leading (num_probes,) axis
    nodes: np.ndarray  # shape=(num_probes, order), float64; eigenvalues of each T
    weights: np.ndarray  # shape=(num_probes, order), float64; zero on breakdown padding


class SpectralDensity(NamedTuple):
    """A smoothed spectral density averaged over probes."""

    grid: np.ndarray  # shape=(grid_len,)
    density: np.ndarray  # shape=(grid_len,); mean over probes, integrates to one
    stderr: np.ndarray  # shape=(grid_len,); standard error of the mean per grid point


@functools.lru_cache(maxsize=32)
def _many_step(reorthogonalize: bool, tol: float):
    step = functools.partial(lanczos_step, reorthogonalize=reorthogonalize, tol=tol)
    return jax.jit(jax.vmap(step, in_axes=(0, None, 0)), donate_argnums=0)


_init_many = jax.jit(jax.vmap(init_state, in_axes=(0, None)), static_argnums=1)
_pack_many = jax.jit(jax.vmap(pack_result))


def _host_slq(operator, starts, order, reorthogonalize, tol):
    state = _init_many(starts, order)
    step_fn = _many_step(reorthogonalize, tol)
    for step in range(order):
        products = operator.matmat(state.basis[:, step])
        state = step_fn(state, step, products.astype(starts.dtype))
        if bool(jnp.all(state.stopped)):
            break
    return _pack_many(state)


def slq(
    operator: Any,
    key: jax.Array,
    *,
    num_probes: int,
    order: int,
    reorthogonalize: bool = True,
) -> SLQResult:
    """Stochastic Lanczos quadrature with ``num_probes`` probes of ``order`` steps.

    ``operator`` is an operator from :func:`jax_spectral.hessian_operator` (or any object
    with ``matvec``, ``matmat``, ``dim``, ``dtype`` and ``traceable``). Raises
    ``ValueError`` for a non-positive ``num_probes`` or ``order``, and
    ``FloatingPointError`` naming the step when a product is NaN or Inf.
    """
    for name, value in (("num_probes", num_probes), ("order", order)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    keys = jax.random.split(key, num_probes)
    if operator.traceable:
        result = jax.vmap(lambda k: lanczos(operator, k, order, reorthogonalize=reorthogonalize))(
            keys
        )
    else:
        dtype = jnp.promote_types(operator.dtype, jnp.float32)
        starts = jax.vmap(lambda k: jax.random.normal(k, (operator.dim,), dtype))(keys)
        result = _host_slq(operator, starts, order, reorthogonalize, _default_tol(dtype))
    bad = np.asarray(result.nonfinite_step)
    if np.any(bad >= 0):
        step = int(bad[bad >= 0].min())
        raise FloatingPointError(
            f"SLQ step {step} (0-based): a matrix-vector product contained NaN or Inf."
        )
    nodes, weights = tridiag_to_eigv(np.asarray(result.tridiag, np.float64))
    steps = np.asarray(result.num_steps)
    # Breakdown padding sits outside the valid block: its eigenvectors have no first
    # component, so its weights are already zero; make that exact.
    for i, k in enumerate(steps):
        if k < order:
            valid_nodes, valid_weights = tridiag_to_eigv(
                np.asarray(result.tridiag[i], np.float64)[:k, :k]
            )
            nodes[i] = np.concatenate([valid_nodes[0], np.zeros(order - k)])
            weights[i] = np.concatenate([valid_weights[0], np.zeros(order - k)])
    return SLQResult(result, nodes, weights)


def spectral_density(
    result: SLQResult,
    *,
    sigma_squared: float = 1e-5,
    grid_len: int = 10000,
    grids: np.ndarray | None = None,
) -> SpectralDensity:
    """Mean density over probes on one grid, with its standard error per grid point.

    The grid spans every probe's nodes (as :func:`jax_spectral.eigv_to_density`), and the
    kernel width is set from it, so all probes share one bandwidth.
    """
    if grids is None:
        _, grids = eigv_to_density(
            result.nodes, result.weights, grid_len=grid_len, sigma_squared=sigma_squared
        )
    per_probe = np.stack(
        [
            eigv_to_density(n[None], w[None], grids=grids, sigma_squared=sigma_squared)[0]
            for n, w in zip(result.nodes, result.weights, strict=True)
        ]
    )
    n = per_probe.shape[0]
    stderr = per_probe.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.full(len(grids), np.inf)
    return SpectralDensity(np.asarray(grids), per_probe.mean(axis=0), stderr)
