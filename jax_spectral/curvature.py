"""Gauss-Newton and Fisher operators, and parameter blocks, on the dataset-reduction engine.

Both take the model and the loss separately: ``model(params, inputs) -> outputs`` (an
array with a leading sample axis, e.g. logits) and ``loss(outputs, targets) -> scalar``
(a name, ``"softmax_cross_entropy"`` or ``"mse"``, or a callable), with batches
``(inputs, targets)``. Everything else (data forms, exact MEAN/SUM, loops, meshes, the CPU
rewrite, ``wrt=`` blocks, checkpoints) is that of :func:`jax_spectral.hessian_operator`.

* ``ggn_operator``: ``G = J^T H_L J`` (positive semi-definite for a convex loss).
* ``fisher_operator(kind="empirical")``: ``sum_i g_i g_i^T / N`` with ``g_i`` sample ``i``'s
  loss gradient (``reduce="sum"``: without ``/ N``).
* ``fisher_operator(kind="mc", key=...)``: the same with labels drawn from the model's
  predictive distribution (``mc_samples`` per sample). Each sample's draws are keyed by
  ``key`` and a hash of the sample's content, so every pass, any batching and any order of
  the same data give the same matrix (identical samples get identical draws). For a named
  loss its expectation is the GGN (for cross-entropy, with target rows summing to 1; the
  draws come from the model alone).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .data import BatchStream, Unwrapping, as_host_arrays, is_array_data, sample_hashes
from .linop import check_hashable
from .operators import CurvatureOperator, build_operator
from .products import OutputProduct, output_loss
from .validate import count

PyTree = Any

__all__ = ["fisher_operator", "ggn_operator", "layer_blocks"]

_FISHER_KINDS = ("empirical", "mc")


def ggn_operator(
    model: Callable[[PyTree, Any], jax.Array],
    loss: str | Callable[[jax.Array, Any], jax.Array],
    params: PyTree,
    data: Any,
    **options: Any,
) -> CurvatureOperator:
    """The generalised Gauss-Newton ``G = J^T H_L J`` over a dataset, as an operator.

    ``J`` is the Jacobian of ``model(params, inputs)`` in the parameters and ``H_L`` the
    Hessian of ``loss(outputs, targets)`` in the outputs. Each product is one linearisation
    of the model (``jax.linearize``: outputs and ``J v``), an output-space product and its
    transpose (``J^T``); neither ``J`` nor the network's second derivatives are formed.
    ``"softmax_cross_entropy"`` and ``"mse"`` use their closed-form ``H_L``; a callable
    loss gets ``H_L u`` by autodiff. ``options``: ``reduce``, ``batch_size``, ``loop``,
    ``mesh``, ``data_axis``, ``rewrite``, ``wrt`` as for
    :func:`jax_spectral.hessian_operator`.

    >>> import jax.numpy as jnp
    >>> model = lambda w, x: x @ w
    >>> X, y = jnp.eye(2), jnp.zeros((2, 1))
    >>> G = ggn_operator(model, "mse", jnp.zeros((2, 1)), (X, y))
    >>> G.matvec(jnp.ones(2))  # 2 X^T X / N
    Array([1., 1.], dtype=float32)
    """
    return _output_operator(model, loss, params, data, "ggn", 1, options)


def fisher_operator(
    model: Callable[[PyTree, Any], jax.Array],
    loss: str | Callable[[jax.Array, Any], jax.Array],
    params: PyTree,
    data: Any,
    *,
    kind: str = "empirical",
    key: jax.Array | None = None,
    mc_samples: int = 1,
    **options: Any,
) -> CurvatureOperator:
    """The Fisher information over a dataset, as an operator (see the module notes).

    ``kind="empirical"``: per-sample gradients at the data's targets, ``sum_i g_i g_i^T /
    N`` for ``reduce="mean"`` (any loss; a callable loss must be a per-sample mean or sum,
    as it is evaluated on one sample at a time). ``kind="mc"``: targets drawn from the
    model's predictive distribution with ``key`` (required), ``mc_samples`` draws per
    sample, for the named losses (a callable loss has no distribution to sample). Products
    cost one linearisation of the model and its transpose, like the GGN's. ``options`` as
    for :func:`ggn_operator`.
    """
    if kind not in _FISHER_KINDS:
        raise ValueError(f"kind must be one of {_FISHER_KINDS}, got {kind!r}.")
    if kind == "empirical":
        if key is not None or mc_samples != 1:
            raise ValueError("key= and mc_samples= apply to kind='mc' only.")
        return _output_operator(model, loss, params, data, "empirical_fisher", 1, options)
    if key is None:
        raise ValueError("the Monte-Carlo Fisher draws labels: give key=jax.random.key(...).")
    mc_samples = count("mc_samples", mc_samples)
    if not isinstance(loss, str):
        raise ValueError(
            "the Monte-Carlo Fisher samples labels from the model's predictive distribution, "
            "which needs a named loss ('softmax_cross_entropy' or 'mse'); for a callable loss "
            "use kind='empirical' or ggn_operator."
        )
    data = _with_sample_keys(data, key)
    return _output_operator(model, loss, params, data, "mc_fisher", int(mc_samples), options)


def _output_operator(model, loss, params, data, kind, mc_samples, options) -> CurvatureOperator:
    if not callable(model):
        raise TypeError(f"model must be callable, model(params, inputs), got {type(model)}.")
    check_hashable(model, "model")
    unknown = set(options) - {
        "reduce",
        "batch_size",
        "loop",
        "mesh",
        "data_axis",
        "rewrite",
        "wrt",
    }
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}.")
    reduce = options.get("reduce", "mean")
    product = OutputProduct(model, output_loss(loss, reduce), kind, mc_samples)
    return build_operator(
        product,
        params,
        data,
        check_batch=lambda p, b: _check_output_batch(product, p, b),
        **options,
    )


def _check_output_batch(product: OutputProduct, params: PyTree, batch: Any) -> None:
    """Clear errors for a batch, model or loss that the output-space products cannot use."""
    entries = 3 if product.kind == "mc_fisher" else 2  # (the third: keys, added here)
    if not isinstance(batch, (tuple, list)) or len(batch) != entries:
        raise ValueError(
            "Gauss-Newton and Fisher operators take batches (inputs, targets), got "
            f"{type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            + "."
        )
    inputs, targets = batch[0], batch[1]
    outputs = jax.eval_shape(Unwrapping(product.model), params, inputs)
    if not isinstance(outputs, jax.ShapeDtypeStruct):
        raise ValueError(
            "model(params, inputs) must return one array (outputs with a leading sample "
            f"axis), got {jax.tree_util.tree_structure(outputs)}."
        )
    n = np.shape(jax.tree_util.tree_leaves(inputs)[0])[0]
    if outputs.ndim == 0 or outputs.shape[0] != n:
        raise ValueError(
            f"model(params, inputs) returned shape {outputs.shape} for {n} samples; the "
            "outputs need the samples on their leading axis."
        )
    name = product.out_loss.name
    target_shape = np.shape(targets)
    if name == "softmax_cross_entropy":
        integer = jnp.issubdtype(jnp.result_type(targets), jnp.integer)
        expected = outputs.shape[:-1] if integer else outputs.shape
        if outputs.ndim != 2 or target_shape != expected:
            raise ValueError(
                f"softmax_cross_entropy takes logits (n, classes) and integer labels (n,) or "
                f"probability rows (n, classes); got outputs {outputs.shape} and targets "
                f"{target_shape} ({jnp.result_type(targets)})."
            )
    elif name == "mse" and target_shape != outputs.shape:
        raise ValueError(
            f"mse compares outputs and targets of one shape; got outputs {outputs.shape} "
            f"and targets {target_shape}."
        )
    value = jax.eval_shape(product.out_loss, outputs, targets)
    if getattr(value, "shape", None) != ():
        raise ValueError(
            "loss(outputs, targets) must return a scalar (the batch's mean or sum), got "
            f"shape {getattr(value, 'shape', None)}."
        )
    if product.kind == "empirical_fisher" and name == "custom":
        _check_per_sample(product, params, inputs, targets)


def _check_per_sample(product: OutputProduct, params: PyTree, inputs: Any, targets: Any):
    """The empirical Fisher of a callable loss needs ``c sum_i l_i`` (``l_i`` the loss of
    sample ``i`` alone): checked on the first batch, where the loss's gradient in the
    outputs must be ``c`` times the single-sample gradients (a weighted mean, a penalty
    on the whole batch's outputs or batch statistics are not)."""
    outputs = product.model(params, inputs)
    fn = product.out_loss.fn
    r = np.asarray(product.out_loss.sample_gradients(outputs, targets), np.float64)
    g = np.asarray(jax.grad(lambda o: fn(o, targets))(outputs), np.float64)
    norm = float(np.sum(r * r))
    if norm == 0.0:
        return
    c = float(np.sum(g * r)) / norm
    eps = float(jnp.finfo(outputs.dtype).eps)
    if np.linalg.norm(g - c * r) > max(1000 * eps, 1e-6) * max(np.linalg.norm(g), 1e-30):
        raise ValueError(
            "the empirical Fisher needs a loss that is c * sum_i l_i, l_i the loss of sample "
            "i alone (a per-sample mean or sum); this loss's gradient in the outputs is not "
            "proportional to the single-sample gradients (sample weights, a term on the "
            "whole batch, batch statistics?). Use ggn_operator, or a per-sample loss."
        )


def _keys_for(batch: Any, key_words: np.ndarray) -> np.ndarray:
    """Per-sample raw PRNG keys ``(n, 2) uint32`` from the content of ``(inputs, targets)``."""
    from .data import _mix

    with np.errstate(over="ignore"):
        mixed = _mix(sample_hashes((batch[0], batch[1])) ^ key_words)
    return np.stack([mixed & np.uint64(0xFFFFFFFF), mixed >> np.uint64(32)], axis=1).astype(
        np.uint32
    )


def _with_sample_keys(data: Any, key: jax.Array) -> Any:
    """``data`` whose batches carry a third entry: each sample's key for its draws."""
    if not isinstance(key, jax.Array) or not (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or key.dtype == jnp.uint32
    ):
        raise TypeError(
            f"key must be a JAX PRNG key (jax.random.key(seed)), got {type(key).__name__}."
        )
    raw = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    words = np.asarray(raw, np.uint32).ravel()  # every word of any PRNG implementation's key
    key_words = np.uint64(int.from_bytes(hashlib.sha256(words.tobytes()).digest()[:8], "little"))

    def augment(batch):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                "the Monte-Carlo Fisher takes batches (inputs, targets), got "
                f"{type(batch).__name__}."
            )
        batch = as_host_arrays(tuple(batch))
        return (batch[0], batch[1], _keys_for(batch, key_words))

    if is_array_data(data):
        return augment(data)
    if isinstance(data, list):
        return [augment(b) for b in data]
    inner = BatchStream(data)
    return lambda: (augment(b) for b in inner)


def layer_blocks(params: PyTree, depth: int = 1) -> dict[str, Callable]:
    """``{name: wrt}`` for each group of leaves that share the first ``depth`` keys of
    their path (for Flax's ``{"params": {"Dense_0": ...}}``, ``depth=2`` gives layers;
    for a Keras bridge's list, ``depth=1`` gives each weight). Pass a value as ``wrt=``."""
    groups: dict[str, tuple] = {}
    for path, _ in jax.tree_util.tree_leaves_with_path(params):
        prefix = tuple(path[:depth])
        groups.setdefault(jax.tree_util.keystr(prefix), prefix)

    def block(prefix):
        return lambda path, _leaf: tuple(path[: len(prefix)]) == prefix

    return {name: block(prefix) for name, prefix in groups.items()}
