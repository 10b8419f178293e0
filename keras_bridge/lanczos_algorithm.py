"""The original package's ``tf2/lanczos_algorithm.py`` on the JAX engine.

    from keras_bridge import lanczos_algorithm
    V, T = lanczos_algorithm.approximate_hessian(model, loss_fn, dataset, order)
    V, T = lanczos_algorithm.lanczos_algorithm(mvp_fn, dim, order)

``H ~ V T V^T`` with ``V`` of shape ``(dim, order)`` and ``T`` of shape ``(order, order)``;
exact when ``order`` equals the dimension. For a model, rows of ``V`` follow
``model.trainable_variables``, each flattened row-major and concatenated (the original
package's vector layout); ``approximate_hessian`` requires ``KERAS_BACKEND=jax``. As in the
original, the recurrence runs in float64 on float32 products.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jax_spectral import hessian_operator, lanczos
from jax_spectral.lanczos import warn_if_broke_down
from jax_spectral.validate import count

from .closure import pure_loss, trainable_values

__all__ = ["approximate_hessian", "lanczos_algorithm"]

_REDUCE_OPS = {"MEAN": "mean", "SUM": "sum"}

Progress = bool | Callable[[int, int, float], None]


def _run(matvec, dim, dtype, order, random_seed, progress, recurrence_dtype):
    """Lanczos from the original's start vector (uniform in [-1, 1], normalised), as
    ``(V (dim, order), T (order, order))`` in float64, warning on a breakdown."""
    if isinstance(random_seed, bool) or not isinstance(random_seed, (int, np.integer)):
        raise TypeError(f"random_seed must be an int, got {random_seed!r}.")
    key = jax.random.key(random_seed)
    v0 = jax.random.uniform(key, (dim,), dtype, minval=-1.0, maxval=1.0)
    result = lanczos(
        matvec,
        None,
        order,
        v0=v0,
        loop="host",
        progress=progress,
        recurrence_dtype=recurrence_dtype,
    )
    warn_if_broke_down(result, order, "V and T are zero past that block")
    return np.asarray(result.basis, np.float64).T, np.asarray(result.padded_tridiag(), np.float64)


def lanczos_algorithm(
    mvp_fn: Callable[[Any], Any],
    dim: int,
    order: int,
    random_seed: int = 0,
    only_gpu: bool = True,
    *,
    progress: Progress = True,
    recurrence_dtype: Any = "float64",
) -> tuple[np.ndarray, np.ndarray]:
    """Lanczos on a symmetric matrix given by its products, as the original's TF2 code.

    Parameters
    ----------
    mvp_fn:
        ``mvp_fn(v) -> A v`` for a float32 column ``v`` of shape ``(dim, 1)`` (a NumPy
        array); it may return anything ``numpy.asarray`` accepts with ``dim`` entries (a
        ``tf.Tensor``, a NumPy or JAX array). It is called from a Python loop, once per step.
    dim, order:
        The matrix's dimension and the number of steps.
    random_seed:
        Seed of the start vector (uniform in [-1, 1], normalised).
    only_gpu:
        Accepted for compatibility; the recurrence runs on JAX's default device.
    progress:
        A progress bar on stderr (the original printed one line per step); ``False``
        for silence, or a callable ``progress(step, order, elapsed_seconds)``.
    recurrence_dtype:
        ``"float64"`` (the original's) or ``"float32"`` (half the memory for ``V``).

    Returns
    -------
    (V, T):
        float64 NumPy arrays of shapes ``(dim, order)`` and ``(order, order)`` with
        ``A ~ V T V^T``. After a breakdown at step ``k < order`` (``order`` above the
        number of distinct eigenvalues; the original produced noise there) columns of ``V``
        and rows and columns of ``T`` from ``k`` on are zero, with a ``RuntimeWarning``.
    """
    del only_gpu
    dim = count("dim", dim)

    def matvec(v):
        w = np.asarray(mvp_fn(np.asarray(v, np.float32).reshape(dim, 1)))
        if w.size != dim:
            raise ValueError(
                f"mvp_fn returned {w.size} entries (shape {w.shape}) for a vector of shape "
                f"({dim}, 1)."
            )
        return w.reshape(dim)

    return _run(matvec, dim, np.float32, order, random_seed, progress, recurrence_dtype)


def approximate_hessian(
    model: Any,
    loss_function,
    dataset: Any,
    order: int,
    reduce_op: str = "MEAN",
    random_seed: int = 0,
    only_gpu: bool = True,
    *,
    progress: Progress = True,
    recurrence_dtype: Any = "float64",
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
        Batches may hold NumPy or JAX arrays, ``tf.Tensor`` s or other array-likes.
    order:
        Number of Lanczos steps.
    reduce_op:
        ``"MEAN"``: the exact mean over samples (each batch weighted by its size);
        ``"SUM"``: the sum of the batch losses' Hessians.
    random_seed:
        Seed of the start vector (uniform in [-1, 1], normalised, as in the original).
    only_gpu:
        Accepted for compatibility; the model and the recurrence run on JAX's default
        device.
    progress:
        A progress bar on stderr with the step, time per step, ETA and the latest
        ``alpha``/``beta`` (the original printed one line per step); ``False`` for silence,
        or a callable ``progress(step, order, elapsed_seconds)``.
    recurrence_dtype:
        ``"float64"`` (default, as in the original: the recurrence in float64 on the
        model's float32 Hessian-vector products) or ``"float32"`` (the basis takes half
        the memory: ``order * num_params * 4`` bytes instead of 8).

    Returns
    -------
    (V, T):
        float64 NumPy arrays of shapes ``(num_params, order)`` and ``(order, order)``.
        After a breakdown at step ``k < order`` (for example ``order`` above the number of
        parameters) columns of ``V`` and rows and columns of ``T`` from ``k`` on are zero,
        with a ``RuntimeWarning``.
    """
    del only_gpu
    if not isinstance(reduce_op, str) or reduce_op.upper() not in _REDUCE_OPS:
        raise ValueError(f"reduce_op must be 'MEAN' or 'SUM', got {reduce_op!r}.")
    params = trainable_values(model)
    loss = pure_loss(model, loss_function)
    operator = hessian_operator(loss, params, dataset, reduce=_REDUCE_OPS[reduce_op.upper()])
    return _run(
        operator, operator.dim, operator.dtype, order, random_seed, progress, recurrence_dtype
    )
