"""The original package's ``tf2/matrix_vector_product.py``: the product of a Keras model's
Hessian with a vector, on the JAX engine (``KERAS_BACKEND=jax``)."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from jax_spectral import hessian_operator

from .closure import pure_loss, trainable_values
from .lanczos_algorithm import _REDUCE_OPS

__all__ = ["model_hessian_vector_product"]

# One pure loss per (model, loss_function): a new closure would compile the products anew.
_LOSSES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _loss_of(model: Any, loss_function: Callable) -> Callable:
    per_model = _LOSSES.setdefault(model, {})
    if loss_function not in per_model:
        per_model[loss_function] = pure_loss(model, loss_function)
    return per_model[loss_function]


def model_hessian_vector_product(
    loss_function: Callable[[Any, Any], Any],
    model: Any,
    dataset: Any,
    v: Any,
    reduce_op: str = "MEAN",
) -> np.ndarray:
    """``H v`` for the Hessian of ``loss_function(model, batch)`` over ``dataset``.

    ``v`` has shape ``(num_params, 1)`` (or ``(num_params,)``), laid out as the
    concatenation of ``model.trainable_variables``, each flattened; it may be a NumPy or
    JAX array or a ``tf.Tensor``. ``reduce_op="MEAN"`` is the exact mean over samples
    (each batch weighted by its size), ``"SUM"`` the sum over batches, as in the original.
    The Hessian is taken at the model's current weights. Returns a float NumPy array shaped
    like ``v``.
    """
    if not isinstance(reduce_op, str) or reduce_op.upper() not in _REDUCE_OPS:
        raise ValueError(f"reduce_op must be 'MEAN' or 'SUM', but got {reduce_op!r}.")
    operator = hessian_operator(
        _loss_of(model, loss_function),
        trainable_values(model),
        dataset,
        reduce=_REDUCE_OPS[reduce_op.upper()],
    )
    v = np.asarray(v)
    if v.size != operator.dim or v.ndim > 2 or (v.ndim == 2 and v.shape[1] != 1):
        raise ValueError(
            f"v must have shape ({operator.dim}, 1) or ({operator.dim},), one entry per "
            f"trainable weight; got {v.shape}."
        )
    return np.asarray(operator.matvec(v.reshape(-1))).reshape(v.shape)
