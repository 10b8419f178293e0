"""The original package's Keras entry point, ``approximate_hessian``, on the JAX engine.

    from keras_bridge import lanczos_algorithm
    V, T = lanczos_algorithm.approximate_hessian(model, loss_fn, dataset, order)

``H ~ V T V^T`` with ``V`` of shape ``(num_trainable_params, order)`` and ``T`` of shape
``(order, order)``; exact when ``order`` equals the number of parameters. Rows of ``V`` follow
``model.trainable_variables``, each flattened row-major and concatenated (the original
package's vector layout). Requires ``KERAS_BACKEND=jax``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jax_spectral import hessian_operator, lanczos

from .closure import pure_loss, trainable_values

__all__ = ["approximate_hessian"]

_REDUCE_OPS = {"MEAN": "mean", "SUM": "sum"}


def approximate_hessian(
    model: Any,
    loss_function,
    dataset: Any,
    order: int,
    reduce_op: str = "MEAN",
    random_seed: int = 0,
    *,
    progress: bool | Callable[[int, int, float], None] = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Lanczos approximation of the Hessian of a Keras model's loss over a dataset.

    Parameters
    ----------
    model:
        A built Keras 3 model under the JAX backend.
    loss_function:
        ``loss_function(model, inputs) -> loss``, as in the original package; ``inputs`` is
        one batch of ``dataset``. A non-scalar loss is differentiated as its sum.
    dataset:
        A list of ``(x, y)`` batches, a tuple of arrays (one batch), a batched
        ``tf.data.Dataset``, a callable returning a fresh iterator, or any re-iterable.
    order:
        Number of Lanczos steps.
    reduce_op:
        ``"MEAN"``: the exact mean over samples (each batch weighted by its size);
        ``"SUM"``: the sum of the batch losses' Hessians.
    random_seed:
        Seed of the start vector (uniform in [-1, 1], normalised, as in the original).

    Returns
    -------
    (V, T):
        float64 arrays of shapes ``(num_params, order)`` and ``(order, order)``. The
        recurrence runs in the model's dtype (float32 for a float32 model; the original ran
        it in float64 on float32 HVPs). After a breakdown at step ``k < order`` (for
        example ``order`` above the number of parameters) columns of ``V`` and rows and
        columns of ``T`` from ``k`` on are zero, with a ``RuntimeWarning``.

    progress:
        A progress bar on stderr with the step, time per step, ETA and the latest
        ``alpha``/``beta`` (the original printed one line per step); ``False`` for silence,
        or a callable ``progress(step, order, elapsed_seconds)``.
    """
    if not isinstance(reduce_op, str) or reduce_op.upper() not in _REDUCE_OPS:
        raise ValueError(f"reduce_op must be 'MEAN' or 'SUM', got {reduce_op!r}.")
    params = trainable_values(model)
    loss = pure_loss(model, loss_function)
    operator = hessian_operator(loss, params, dataset, reduce=_REDUCE_OPS[reduce_op.upper()])
    key = jax.random.key(random_seed)
    v0 = jax.random.uniform(key, (operator.dim,), operator.dtype, minval=-1.0, maxval=1.0)
    result = lanczos(operator, None, order, v0=v0, loop="host", progress=progress)
    steps = int(result.num_steps)
    if steps < order:
        warnings.warn(
            f"Lanczos broke down after {steps} of {order} steps (the Krylov space is "
            "invariant, e.g. order exceeds the number of parameters or distinct eigenvalues); "
            "V and T are zero past that block.",
            RuntimeWarning,
            stacklevel=2,
        )
    return np.asarray(result.basis, np.float64).T, np.asarray(result.tridiag, np.float64)
