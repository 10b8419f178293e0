"""``hessian_computation.py`` of the original package: ``hvp``, ``get_hvp_fn`` and the
two-argument ``full_hessian``, on :func:`jax_spectral.hessian_operator`."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ..data import is_array_data
from ..hvp import full_hessian as _full_hessian
from ..hvp import hvp as hvp
from ..operators import _layout, hessian_operator

PyTree = Any

__all__ = ["full_hessian", "get_hvp_fn", "hvp"]


def full_hessian(loss: Callable[[PyTree], jax.Array], params: PyTree) -> jax.Array:
    """Dense ``(P, P)`` Hessian of ``loss(params)`` in ``ravel_pytree`` order (small models
    only; memory grows as ``P**2``)."""
    return _full_hessian(loss, params)


def get_hvp_fn(
    loss: Callable[[PyTree, Any], jax.Array], params: PyTree, batches: Any
) -> tuple[Callable[[PyTree, jax.Array], jax.Array], Callable[[jax.Array], PyTree], int]:
    """``(hvp_fn, unravel, num_params)`` for the Hessian of ``loss`` over ``batches``.

    ``hvp_fn(params, v)`` maps a flat vector ``v`` of shape ``(num_params,)`` to ``H v``,
    the Hessian at ``params`` of the loss reduced over every batch of ``batches`` (a
    callable returning a fresh iterator of batches on each call, as in the original, or
    anything :func:`jax_spectral.hessian_operator` takes). The reduction is the exact mean
    over samples, each batch weighted by its size; the original divided the sum of batch
    Hessians by the number of batches, which differs when the last batch is smaller.
    ``unravel`` maps a flat vector to a params-shaped pytree.

    ``hvp_fn`` reads its batches on the host, as the original did (a list, or arrays given
    as one batch, are read the same way), so it cannot be traced;
    :func:`jax_spectral.lanczos` and ``lanczos_alg`` detect that and drive it from a Python
    loop (``lanczos_alg(lambda v: hvp_fn(params, v), num_params, order, key)`` works as it
    did in the original). A closure over in-memory data would otherwise be compiled with
    the data as constants. For speed, pass ``hessian_operator(loss, params, data)`` itself
    to :func:`jax_spectral.lanczos`, which scans in-memory batches in one compiled loop.

    Raises ``ValueError`` when ``batches`` yields nothing, or hands out one iterator that
    a second pass would find exhausted (a generator object rather than a generator
    function).
    """
    if isinstance(batches, list):
        batches = functools.partial(iter, batches)
    elif is_array_data(batches):
        batches = functools.partial(iter, [batches])
    operator = hessian_operator(loss, params, batches)
    layout = operator.layout

    def hvp_fn(params_at: PyTree, v: jax.Array) -> jax.Array:
        at = operator
        if params_at is not params:
            at_params = jax.tree_util.tree_map(jnp.asarray, params_at)
            if _layout(at_params) != layout:
                raise ValueError(
                    "hvp_fn(params, v): params must have the structure, shapes and dtypes "
                    "of the params given to get_hvp_fn."
                )
            at = dataclasses.replace(operator, params=at_params)
        return at.matvec(v)

    return hvp_fn, operator.unravel, operator.dim
