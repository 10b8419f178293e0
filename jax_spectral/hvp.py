"""Hessian-vector products by forward-over-reverse differentiation.

For a scalar loss ``L(params, batch)`` the Hessian-vector product is the directional
derivative of the gradient,

    H v = d/dt grad L(params + t v) at t = 0,

computed as ``jax.jvp`` of ``jax.grad``: one forward-mode pass through the reverse-mode
gradient, about two to three gradient passes in cost, exact to rounding, and with memory
of a single gradient pass. Reverse-over-reverse and finite differences are not used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

PyTree = Any
Loss = Callable[[PyTree, Any], jax.Array]

__all__ = ["check_like", "check_params", "full_hessian", "hvp", "loss_and_hvp"]


def check_params(params: PyTree) -> None:
    """Raise ``TypeError`` unless every leaf of ``params`` is a real floating array.

    Integer leaves have no Hessian and complex leaves would need a Wirtinger convention
    that this library does not define; both are rejected with the leaf's path named.
    """
    leaves = jax.tree_util.tree_leaves_with_path(params)
    if not leaves:
        raise ValueError("params has no array leaves: there is nothing to differentiate.")
    for path, leaf in leaves:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            kind = "complex" if jnp.issubdtype(dtype, jnp.complexfloating) else "non-floating"
            raise TypeError(
                f"params leaf {jax.tree_util.keystr(path)} has {kind} dtype {dtype}; "
                "Hessians are defined here for real floating-point parameters only. "
                "Keep integer state (step counters, indices) out of the params pytree, "
                "for example by closing over it in the loss."
            )


def check_scalar_loss(loss: Loss, params: PyTree, batch: Any) -> None:
    """Raise ``ValueError`` unless ``loss(params, batch)`` is a real scalar (checked abstractly)."""
    out = jax.eval_shape(loss, params, batch)
    shape = getattr(out, "shape", None)
    if shape != ():
        raise ValueError(
            f"loss(params, batch) must return a scalar, got an output of shape {shape}. "
            "Reduce it inside the loss, e.g. return jnp.mean(per_example_losses)."
        )


def check_like(template: PyTree, tree: PyTree, what: str = "v") -> None:
    """Raise ``ValueError`` unless ``tree`` has the pytree structure and leaf shapes of
    ``template`` (dtypes may differ). Flattening a tree of another structure with the same
    total size would silently misalign its entries."""
    t_def, v_def = jax.tree_util.tree_structure(template), jax.tree_util.tree_structure(tree)
    if t_def != v_def:
        raise ValueError(
            f"{what} must have the same pytree structure as params; got params {t_def} and "
            f"{what} {v_def}."
        )
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(template), jax.tree_util.tree_leaves(tree), strict=True
    ):
        if np.shape(a) != np.shape(b):
            raise ValueError(
                f"{what}{jax.tree_util.keystr(path)} has shape {np.shape(b)}, but the params "
                f"leaf has shape {np.shape(a)}."
            )


def _grad_value(loss: Loss, batch: Any) -> Callable[[PyTree], tuple[jax.Array, PyTree]]:
    def value_and_grad(p):
        return jax.value_and_grad(loss)(p, batch)

    return value_and_grad


def loss_and_hvp(loss: Loss, params: PyTree, batch: Any, v: PyTree) -> tuple[jax.Array, PyTree]:
    """Return ``(loss(params, batch), H v)`` from one forward-over-reverse pass.

    The loss value is the primal output of the same pass, so it costs nothing extra; the
    operators use it to detect a non-finite loss.
    """
    v = jax.tree_util.tree_map(lambda p, t: jnp.asarray(t, jnp.result_type(p)), params, v)
    (value, _), (_, hv) = jax.jvp(_grad_value(loss, batch), (params,), (v,))
    return value, hv


def hvp(loss: Loss, params: PyTree, batch: Any, v: PyTree) -> PyTree:
    """Hessian of ``loss(params, batch)`` with respect to ``params``, applied to ``v``.

    Parameters
    ----------
    loss:
        ``loss(params, batch) -> scalar``; a pure JAX function.
    params:
        Pytree of real floating arrays.
    batch:
        Anything ``loss`` accepts as its second argument (arrays, tuples, dicts).
    v:
        Pytree with the structure and shapes of ``params``.

    Returns
    -------
    A pytree shaped like ``params`` holding ``H v``. Works under ``jax.jit`` and
    ``jax.vmap`` over ``v``.

    Raises
    ------
    TypeError
        A params leaf is integer or complex.
    ValueError
        The loss is not a scalar, or ``v`` does not match the structure of ``params``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> loss = lambda p, x: jnp.sum(p["w"] ** 2 * x)
    >>> hvp(loss, {"w": jnp.ones(2)}, jnp.array([1.0, 3.0]), {"w": jnp.ones(2)})["w"]
    Array([2., 6.], dtype=float32)
    """
    check_params(params)
    check_like(params, v)
    check_scalar_loss(loss, params, batch)
    return loss_and_hvp(loss, params, batch, v)[1]


_NO_BATCH = object()


def full_hessian(loss: Loss, params: PyTree, batch: Any = _NO_BATCH) -> jax.Array:
    """Dense ``(P, P)`` Hessian of ``loss(params, batch)`` in ``ravel_pytree`` order.

    Without ``batch``, ``loss`` is a function of the parameters alone, ``loss(params)``,
    as in the original package's ``full_hessian(loss, params)``.

    Memory and time grow as ``P**2``: meant for small models, tests and examples.
    Entry ``[i, j]`` is the second derivative with respect to the ``i``-th and ``j``-th
    entries of ``jax.flatten_util.ravel_pytree(params)[0]``.
    """
    if batch is _NO_BATCH:
        return full_hessian(lambda p, _: loss(p), params, None)
    check_params(params)
    check_scalar_loss(loss, params, batch)
    flat, unravel = ravel_pytree(params)
    return jax.hessian(lambda f: loss(unravel(f), batch))(flat)
