"""Per-batch curvature products: what the dataset-reduction engine sums over batches.

A product is a static, hashable object called as ``product(params, batch, tangent, embed)``
and returning ``(value, out)``: the batch loss (checked for finiteness by the engine) and
the batch matrix applied to ``tangent``. ``params`` and ``tangent`` are lists of the
differentiated leaves and ``embed`` maps such a list to the full params pytree (the other
leaves held fixed; see ``wrt=``). Each product also exposes ``loss(params, batch)``, the
batch loss as a function of the full params, for input checks, the choice of loop and
checkpoint fingerprints, and ``rewritten(onednn)``, the same product with its functions
evaluated through :func:`jax_spectral.rewrite.cpu_friendly`.

* :class:`HessianProduct`: ``H v`` by forward-over-reverse (``jax.jvp`` of ``jax.grad``).
* :class:`OutputProduct`: ``J^T M J v`` for a model ``f(params, inputs) -> outputs``: one
  ``jax.linearize`` of the model gives ``o`` and ``u = J v``, an output-space product gives
  ``M u``, and the transposed linearisation gives ``J^T M u`` (``J`` is never formed).
  ``M`` is the Hessian of the loss in the outputs (the generalised Gauss-Newton), or a sum
  of outer products of output-space gradients (the empirical and Monte-Carlo Fisher).

Output-space losses (:class:`OutputLoss`): ``loss(outputs, targets) -> scalar``, the loss
of a batch of outputs with a leading sample axis. ``"softmax_cross_entropy"`` (logits;
targets integer labels or probability rows) and ``"mse"`` (the mean over a sample's output
entries of the squared error) have closed forms for their output-space Hessians,
``t (diag(p) - p p^T)`` (``t`` the sum of the sample's target row, 1 for labels) and
``2/K I`` per sample, and a likelihood for Monte-Carlo labels; any other callable gets the
general path (autodiff in the outputs). A named loss is the batch mean of its per-sample
losses for ``reduce="mean"`` and their sum for ``reduce="sum"``; a callable is whatever it
computes (the empirical Fisher reads its ``c`` in ``c sum_i l_i`` from its gradient).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .data import Unwrapping, unwrap_static
from .hvp import loss_and_hvp
from .linop import check_hashable

PyTree = Any

__all__ = ["HessianProduct", "OutputLoss", "OutputProduct", "output_loss"]

NAMED_LOSSES = ("softmax_cross_entropy", "mse")


def _rewrite(fn: Callable, onednn: bool) -> Callable:
    from .rewrite import cpu_friendly

    return cpu_friendly(fn, onednn=onednn)


@dataclasses.dataclass(frozen=True)
class HessianProduct:
    """``(loss, H v)`` of ``loss(params, batch)`` by forward-over-reverse."""

    loss: Callable
    kind: str = "hessian"
    product_loss: Callable | None = None  # the loss as the products evaluate it

    def __call__(self, params, batch, tangent, embed):
        loss = self.product_loss or self.loss
        batch = unwrap_static(batch)
        return loss_and_hvp(lambda p, b: loss(embed(p), b), params, batch, tangent)

    def rewritten(self, onednn: bool) -> HessianProduct:
        return dataclasses.replace(self, product_loss=_rewrite(self.loss, onednn))

    def rewrite_target(self, params: PyTree, batch: Any) -> tuple[Callable, tuple]:
        """The function the CPU rewrite wraps, and its arguments on ``batch``."""
        return self.loss, (params, unwrap_static(batch))

    @property
    def evaluated_loss(self) -> Callable:
        """The loss as the products evaluate it, on the engine's batches."""
        return Unwrapping(self.product_loss or self.loss)


@dataclasses.dataclass(frozen=True)
class OutputLoss:
    """A loss on a batch of outputs (see the module notes); ``name`` is one of
    ``NAMED_LOSSES`` or ``"custom"`` for ``fn``."""

    name: str
    fn: Callable | None = None
    reduce: str = "mean"

    def per_sample(self, outputs: jax.Array, targets: Any) -> jax.Array:
        """The ``(n,)`` per-sample losses of a named loss."""
        if self.name == "softmax_cross_entropy":
            logp = jax.nn.log_softmax(outputs, axis=-1)
            if jnp.issubdtype(jnp.result_type(targets), jnp.integer):
                return -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
            return -jnp.sum(targets * logp, axis=-1)
        error = (outputs - targets).reshape(outputs.shape[0], -1)
        return jnp.mean(error**2, axis=-1)

    def __call__(self, outputs: jax.Array, targets: Any) -> jax.Array:
        if self.name == "custom":
            return self.fn(outputs, targets)
        losses = self.per_sample(outputs, targets)
        return jnp.mean(losses) if self.reduce == "mean" else jnp.sum(losses)

    def _scale(self, n: int) -> float:
        return 1.0 / n if self.reduce == "mean" else 1.0

    def hessian_product(self, outputs: jax.Array, targets: Any, u: jax.Array) -> jax.Array:
        """The Hessian of the batch loss in the outputs, applied to ``u``."""
        n = outputs.shape[0]
        if self.name == "softmax_cross_entropy":
            p = jax.nn.softmax(outputs, axis=-1)
            pu = jnp.sum(p * u, axis=-1, keepdims=True)
            # per sample (sum of the target row) (diag(p) - p p^T): rows need not sum to 1
            mass = 1.0
            if not jnp.issubdtype(jnp.result_type(targets), jnp.integer):
                mass = jnp.sum(targets, axis=-1, keepdims=True).astype(p.dtype)
            return self._scale(n) * mass * (p * u - p * pu)
        if self.name == "mse":
            return self._scale(n) * (2.0 / math.prod(outputs.shape[1:])) * u
        return jax.jvp(jax.grad(lambda o: self.fn(o, targets)), (outputs,), (u,))[1]

    def sample_gradients(self, outputs: jax.Array, targets: Any) -> jax.Array:
        """Each sample's loss gradient in its outputs, shape of ``outputs``."""
        if self.name == "custom":

            def one(o, t):
                return jax.grad(
                    lambda o1: self.fn(o1[None], jax.tree_util.tree_map(lambda a: a[None], t))
                )(o)

            return jax.vmap(one)(outputs, targets)
        return jax.vmap(jax.grad(lambda o, t: self.per_sample(o[None], t[None])[0]))(
            outputs, targets
        )

    def sampled_gradients(self, outputs: jax.Array, keys: jax.Array, draws: int) -> jax.Array:
        """Output-space gradients at labels drawn from the model's predictive distribution,
        shape ``(draws,) + outputs.shape``: ``p - onehot(y)`` with ``y ~ softmax(o)``, or
        ``-sqrt(2/K) eps`` with ``eps ~ N(0, I)`` (the Gaussian whose negative log-likelihood
        is the ``"mse"`` loss up to a constant)."""
        if self.name == "custom":
            raise ValueError("the Monte-Carlo Fisher needs a named loss (it samples labels).")

        def one(o, raw):
            key = jax.random.wrap_key_data(raw, impl="threefry2x32")
            keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.arange(draws))
            if self.name == "softmax_cross_entropy":
                p = jax.nn.softmax(o, axis=-1)
                labels = jax.vmap(lambda k: jax.random.categorical(k, o, axis=-1))(keys)
                return p[None] - jax.nn.one_hot(labels, o.shape[-1], dtype=o.dtype)
            eps = jax.vmap(lambda k: jax.random.normal(k, o.shape, o.dtype))(keys)
            return -math.sqrt(2.0 / math.prod(o.shape)) * eps

        return jnp.moveaxis(jax.vmap(one)(outputs, keys), 1, 0)


def output_loss(loss: str | Callable, reduce: str) -> OutputLoss:
    """An :class:`OutputLoss` from a name in ``NAMED_LOSSES`` or a callable."""
    if isinstance(loss, str):
        if loss not in NAMED_LOSSES:
            raise ValueError(f"loss must be one of {NAMED_LOSSES} or a callable, got {loss!r}.")
        return OutputLoss(loss, None, reduce)
    if not callable(loss):
        raise TypeError(f"loss must be a name or a callable, got {type(loss).__name__}.")
    check_hashable(loss, "loss")
    return OutputLoss("custom", loss, reduce)


@dataclasses.dataclass(frozen=True)
class OutputProduct:
    """``J^T M J v`` for ``model(params, inputs)`` and an :class:`OutputLoss` (see the
    module notes). ``kind``: ``"ggn"`` (``M`` the loss's Hessian in the outputs),
    ``"empirical_fisher"`` (``M = c sum_i r_i r_i^T``, ``r_i`` sample ``i``'s loss gradient
    in its outputs, ``c`` 1/n for a mean and 1 for a sum) or ``"mc_fisher"`` (the same with
    ``mc_samples`` sampled labels per sample, averaged; the batch carries each sample's
    key as its third entry)."""

    model: Callable
    out_loss: OutputLoss
    kind: str = "ggn"
    mc_samples: int = 1
    product_model: Callable | None = None

    def loss(self, params: PyTree, batch: Any) -> jax.Array:
        batch = unwrap_static(batch)
        return self.out_loss(self.model(params, batch[0]), batch[1])

    def evaluated_loss(self, params: PyTree, batch: Any) -> jax.Array:
        model = self.product_model or self.model
        batch = unwrap_static(batch)
        return self.out_loss(model(params, batch[0]), batch[1])

    def rewritten(self, onednn: bool) -> OutputProduct:
        return dataclasses.replace(self, product_model=_rewrite(self.model, onednn))

    def rewrite_target(self, params: PyTree, batch: Any) -> tuple[Callable, tuple]:
        """The function the CPU rewrite wraps, and its arguments on ``batch``."""
        return self.model, (params, unwrap_static(batch)[0])

    def __call__(self, params, batch, tangent, embed):
        model = self.product_model or self.model
        batch = unwrap_static(batch)
        inputs, targets = batch[0], batch[1]
        outputs, push = jax.linearize(lambda p: model(embed(p), inputs), params)
        u = push(tangent)
        value = self.out_loss(outputs, targets)
        n = outputs.shape[0]
        scale = 1.0 / n if self.out_loss.reduce == "mean" else 1.0
        if self.kind == "ggn":
            mu = self.out_loss.hessian_product(outputs, targets, u)
        elif self.kind == "empirical_fisher":
            r = self.out_loss.sample_gradients(outputs, targets)
            if self.out_loss.name == "custom":
                scale = _loss_scale(self.out_loss.fn, outputs, targets, r)
            mu = scale * r * _per_sample_dot(r, u)
        else:
            r = self.out_loss.sampled_gradients(outputs, batch[2], self.mc_samples)
            mu = scale * jnp.mean(r * jax.vmap(_per_sample_dot, (0, None))(r, u), axis=0)
        (out,) = jax.linear_transpose(push, params)(mu.astype(outputs.dtype))
        return value, out


def _loss_scale(fn: Callable, outputs: jax.Array, targets: Any, r: jax.Array) -> jax.Array:
    """``c`` for a callable batch loss ``c sum_i l_i`` (1/n for a mean, 1 for a sum), from
    its gradient in the outputs against the single-sample gradients ``r``: the empirical
    Fisher of the batch is then ``c sum_i r_i r_i^T``, whatever ``reduce`` says, as the
    Hessian and the GGN of that batch loss are."""
    batch_grad = jax.grad(lambda o: fn(o, targets))(outputs)
    norm = jnp.sum(r * r)
    return jnp.where(norm > 0, jnp.sum(batch_grad * r) / jnp.where(norm > 0, norm, 1), 0.0)


def _per_sample_dot(r: jax.Array, u: jax.Array) -> jax.Array:
    """``r_i . u_i`` per sample, shaped to broadcast against ``r``."""
    dots = jnp.sum((r * u).reshape(r.shape[0], -1), axis=-1)
    return dots.reshape((r.shape[0],) + (1,) * (r.ndim - 1))
