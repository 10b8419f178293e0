"""Curvature operators over a whole dataset.

``hessian_operator(loss, params, data)`` returns a :class:`HessianOperator`: the Hessian
of the dataset loss at ``params`` as a linear map on flat vectors of length ``dim``
(the ``ravel_pytree`` order of ``params``), built from per-batch Hessian-vector products.

Reductions
----------
``reduce="mean"`` is the exact mean over samples: with batches of ``n_b`` samples whose
loss is the batch mean, ``H = sum_b (n_b / N) H_b``, so a ragged last batch is weighted
correctly. (The original package divided by the number of batches, which is wrong when
batches differ in size.) ``reduce="sum"`` is the plain sum ``sum_b H_b`` of the batch
Hessians.

Loops over batches
------------------
In-memory arrays can run entirely inside ``jit`` (``loop="scan"``: a ``lax.scan`` over
the stacked equal batches plus the remainder batch), so Lanczos can wrap the whole
operator in one compiled program. Streams, and models that XLA runs slowly inside a loop,
use ``loop="host"``: a Python loop over batches calling one jitted per-batch step.
``loop="auto"`` picks ``"host"`` on CPU when the products still contain an XLA
convolution (XLA's CPU backend runs convolution gradients many times slower inside a while
loop, see jax-ml/jax#12868 and ``benchmarks/bench_core.py``) and ``"scan"`` otherwise.

CPU rewrite
-----------
On CPU (``rewrite="auto"``) the products evaluate the loss through
:func:`jax_spectral.rewrite.cpu_friendly`: float32 convolutions through oneDNN's kernels
where the optional ``onednn-cpu-gomp`` package is installed (``rewrite="onednn"``), else
as chunked patch matrix products (``rewrite="patches"``); non-overlapping max pooling as
strided-slice selections: equal to float32 rounding, much faster for convnets on CPU, and
fast inside ``lax.scan`` too (``docs/benchmarks.md``), so such models get the scanned
loop. Convolutions the rewrite does not cover (grouped, transposed) stay XLA's, and keep
the host loop on CPU. ``loss`` itself is kept as given.

Non-finite values
-----------------
The loss value is a by-product of each HVP. If the dataset loss or any HVP entry is NaN or
Inf, ``matvec`` returns a vector of NaN; :func:`jax_spectral.lanczos` then raises, naming
the step. NaN never passes silently.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ._processes import all_ok, gather, operand_mesh, replicate, smallest
from .costs import LINEARIZE_FRACTION, USABLE_FRACTION, free_device_bytes
from .data import (
    BatchStream,
    HostOnlyError,
    StreamContent,
    Unwrapping,
    batch_size_of,
    is_array_data,
    split_arrays,
    stack_batches,
)
from .hvp import check_params, check_scalar_loss
from .linop import (
    OperatorAlgebra,
    check_hashable,
    check_vector,
    check_vectors,
    ravel_checked,
    unraveler,
)
from .linop import layout as _layout
from .products import HessianProduct
from .rewrite import convolutions, rewrites
from .validate import count

PyTree = Any

__all__ = ["CurvatureOperator", "HessianOperator", "build_operator", "hessian_operator"]

_REDUCTIONS = ("mean", "sum")
_LOOPS = ("auto", "scan", "host")
_REWRITES = ("auto", "none", "cpu", "onednn", "patches")
_SLOW_IN_LOOP_ON_CPU = frozenset({"conv_general_dilated"})
HOST_TANGENT_CHUNK = 4  # tangents per vmapped product where the working memory is unknown


def _accumulate(kernel, params, batch, v, acc, loss_sum, weight):
    value, out = kernel(params, batch, v)
    # The sums are kept in at least float32 (``acc``'s dtype): a bf16 sum over many batches
    # loses the small terms (10% of |Hv| over 1,024 batches).
    acc = jax.tree_util.tree_map(
        lambda a, h: a + weight.astype(a.dtype) * h.astype(a.dtype), acc, out
    )
    return acc, loss_sum + value.astype(loss_sum.dtype)


def _accumulate_some(kernel, params, batch, v, acc, loss_sum, weight, chunk):
    """One batch's contribution for one tangent (``chunk=None``), or for a leading axis of
    tangents: the batch is read once and serves every tangent.

    For many tangents the product is linearised once (``jax.linearize``: the forward and
    backward passes of the loss, which do not depend on the tangent, run once and keep
    what the tangents need), and the linear map is applied to ``chunk`` tangents at a time
    (``lax.map``), so the working memory grows with ``chunk``, not with the number of
    tangents, as it did with a ``vmap`` of the product over all of them (docs/design.md,
    ``benchmarks/bench_slq.py --memory``)."""
    if chunk is None:
        return _accumulate(kernel, params, batch, v, acc, loss_sum, weight)
    zero = jax.tree_util.tree_map(lambda t: jnp.zeros(t.shape[1:], t.dtype), v)
    linear, value = _linearize(kernel, params, batch, zero)
    return _apply_linear(linear, v, acc, loss_sum, weight, value, chunk)


def _linearize(kernel, params, batch, zero):
    """One batch's product linearised in the tangent: ``(linear, value)``, where
    ``linear(tangent)`` is the batch matrix applied to ``tangent`` (a
    ``jax.tree_util.Partial`` whose leaves hold what the forward and backward passes of the
    loss left for the tangent's passes) and ``value`` is the batch loss."""

    def product(t):
        value, out = kernel(params, batch, t)
        return out, value

    def kept(fn):
        return _tree_bytes(jax.eval_shape(lambda z: jax.linearize(fn, z, has_aux=True)[1], zero))

    rebuilt = jax.checkpoint(product, policy=_keep_unless_broadcast, prevent_cse=False)
    # The policy replaces any jax.checkpoint in the loss by its own (everything kept but
    # broadcasts): where the loss's remat kept less, as it can, linearise it as written.
    chosen = rebuilt if kept(rebuilt) <= kept(product) else product
    _, linear, value = jax.linearize(chosen, zero, has_aux=True)
    return linear, value


def _keep_unless_broadcast(primitive, *avals, **params) -> bool:
    """What a linearisation keeps for the tangent's passes: every value the passes need,
    except broadcasts, which they recompute from the broadcast operand. Derivative rules
    fill arrays with a constant this way (``jnp.where(x > 0, g, 0)`` in a ReLU's rule, the
    unselected branches of max pooling): kept, they were arrays of zeros the size of
    activations, half of the CIFAR CNN's linearisation (192 of 355 MB), read by every
    product; recomputed, they are one scalar each, and the products are unchanged."""
    return primitive is not jax.lax.broadcast_in_dim_p


def _apply_linear(linear, v, acc, loss_sum, weight, value, chunk):
    """A linearised batch's contribution: for one tangent (``chunk=None``) or ``chunk`` at
    a time of a leading axis of tangents."""
    if chunk is None:
        out = linear(v)
    else:
        num = jax.tree_util.tree_leaves(v)[0].shape[0]
        out = jax.lax.map(linear, v, batch_size=min(chunk, num))
    acc = jax.tree_util.tree_map(
        lambda a, h: a + weight.astype(a.dtype) * h.astype(a.dtype), acc, out
    )
    return acc, loss_sum + value.astype(loss_sum.dtype)


@functools.partial(jax.jit, static_argnums=(6,), donate_argnums=(2,))
def _linear_step(linear, v, acc, loss_sum, weight, value, chunk=None):
    return _apply_linear(linear, v, acc, loss_sum, weight, value, chunk)


@functools.partial(jax.jit, static_argnums=(0,))
def _linearize_step(kernel, params, batch, zero):
    return _linearize(kernel, params, batch, zero)


@functools.partial(jax.jit, static_argnums=(0,))
def _linearize_index(kernel, params, stacked, index, zero):
    batch = jax.tree_util.tree_map(lambda a: a[index], stacked)
    return _linearize(kernel, params, batch, zero)


def _gradient_of(operator, batch):
    """The flat gradient of ``batch``'s loss in the operator's differentiated leaves, in
    at least float32."""
    leaves, treedef = jax.tree_util.tree_flatten(operator.params)
    select = operator.select or (True,) * len(leaves)
    chosen = [x for x, s in zip(leaves, select, strict=True) if s]

    def loss(chosen):
        it = iter(chosen)
        full = [next(it) if s else x for x, s in zip(leaves, select, strict=True)]
        return operator.product_loss(treedef.unflatten(full), batch)

    flat = ravel_pytree(jax.grad(loss)(chosen))[0]
    return flat.astype(jnp.promote_types(flat.dtype, jnp.float32))


_batch_gradient = jax.jit(_gradient_of)


@jax.jit
def _stacked_gradients(operator):
    return jax.lax.map(lambda batch: _gradient_of(operator, batch), operator.stacked)


@jax.jit
def _linearize_scanned(operator):
    """Every batch of a scanned operator linearised: ``(stacked, remainder, tail)``, each
    ``(linear, value)`` or ``None``; the stacked batches' with a leading batch axis."""
    kernel, params, zero = operator._kernel, operator.params, operator._zero_tangent()
    stacked = None
    if operator.stacked is not None:
        stacked = jax.lax.map(lambda b: _linearize(kernel, params, b, zero), operator.stacked)
    rest = [
        None if b is None else _linearize(kernel, params, b, zero)
        for b in (operator.remainder, operator.tail)
    ]
    return stacked, *rest


@functools.partial(jax.jit, static_argnums=(0, 7), donate_argnums=(4,))
def _batch_step(kernel, params, batch, v, acc, loss_sum, weight, chunk=None):
    return _accumulate_some(kernel, params, batch, v, acc, loss_sum, weight, chunk)


@functools.partial(jax.jit, static_argnums=(0, 8), donate_argnums=(5,))
def _stacked_step(kernel, params, stacked, index, v, acc, loss_sum, weight, chunk=None):
    batch = jax.tree_util.tree_map(lambda a: a[index], stacked)
    return _accumulate_some(kernel, params, batch, v, acc, loss_sum, weight, chunk)


def _finish(acc: PyTree, loss_sum: jax.Array, scale, dtype, many: bool = False) -> jax.Array:
    """The flat sum, scaled, checked for non-finite values and rounded once to ``dtype``;
    ``many``: each leaf has a leading axis of tangents."""
    if many:
        flat = jax.vmap(lambda a: ravel_pytree(a)[0])(acc) * scale
    else:
        flat = ravel_pytree(acc)[0] * scale
    flat = flat.astype(dtype)  # checked after rounding: a float16 product may overflow here
    ok = jnp.isfinite(loss_sum) & jnp.all(jnp.isfinite(flat), axis=-1, keepdims=many)
    return jnp.where(ok, flat, jnp.nan)


@dataclasses.dataclass(frozen=True)
class _Kernel:
    """A per-batch product restricted to the selected leaves (static, hashable): called
    with the full params, a batch and a list of tangent leaves for the selected ones."""

    product: Any
    select: tuple | None  # per params leaf: differentiated or held fixed; None: all

    def __call__(self, params, batch, tangent):
        leaves, treedef = jax.tree_util.tree_flatten(params)
        select = self.select or (True,) * len(leaves)

        def embed(chosen):
            chosen = iter(chosen)
            pairs = zip(leaves, select, strict=True)
            return treedef.unflatten([next(chosen) if s else x for x, s in pairs])

        chosen = [x for x, s in zip(leaves, select, strict=True) if s]
        return self.product(chosen, batch, list(tangent), embed)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["params", "stacked", "remainder", "tail", "linear"],
    meta_fields=[
        "product",
        "reduce",
        "loop",
        "num_samples",
        "batch_size",
        "stream",
        "layout",
        "rewrite",
        "select",
    ],
)
@dataclasses.dataclass(frozen=True, eq=False)
class CurvatureOperator(OperatorAlgebra):
    """A curvature matrix of a dataset loss (Hessian, Gauss-Newton, Fisher, or a block of
    one) as a linear operator on flat vectors: the dataset-reduction engine summing a
    per-batch product (:mod:`jax_spectral.products`) over batches.

    A pytree: the parameters and in-memory batches are its leaves, the product and settings
    its static part, so an operator can be passed through ``jax.jit`` without its arrays
    being baked into the program as constants.

    Attributes
    ----------
    dim: number of differentiated parameters ``P``; ``matvec`` maps ``(P,)`` to ``(P,)``.
    dtype: the dtype of the flattened parameters and of ``matvec``'s output.
    kind: ``"hessian"``, ``"ggn"``, ``"empirical_fisher"`` or ``"mc_fisher"``.
    traceable: ``True`` when ``matvec`` can run under ``jit``/``vmap``/``lax.scan``
        (in-memory data with ``loop="scan"``); host-driven operators are not traceable,
        and :func:`jax_spectral.lanczos` drives them from a Python loop.
    num_samples: ``N`` for in-memory data; for streams, known after the first pass.
    select: ``None``, or per params leaf whether it is differentiated (``wrt=``): the
        vectors then hold the selected leaves only, and ``unravel`` gives a pytree with
        ``None`` in place of the others.
    """

    params: PyTree
    stacked: PyTree | None  # equal batches stacked on a leading axis (in-memory data)
    remainder: PyTree | None  # the last, smaller batch (in-memory data)
    product: Any = dataclasses.field(repr=False, default=None)
    reduce: str = "mean"
    loop: str = "scan"
    num_samples: int | None = None
    batch_size: int | None = None
    stream: BatchStream | None = dataclasses.field(default=None, repr=False)
    layout: tuple = dataclasses.field(default=(), repr=False)
    rewrite: str = "none"  # "onednn", "patches" or "none" (see hessian_operator)
    select: tuple | None = None
    # On a mesh, the samples of the remainder past its largest multiple of the data
    # devices (replicated; the remainder before them is split over the devices).
    tail: PyTree | None = None
    # ``(stacked, remainder, tail)`` of :meth:`linearized`: each batch's product linearised
    # in the tangent, ``(linear, value)`` or ``None`` (a host loop's stacked: a tuple).
    linear: PyTree | None = dataclasses.field(default=None, repr=False)

    # -- shapes and conversions -------------------------------------------------------
    @property
    def unravel(self) -> Callable[[jax.Array], PyTree]:
        """Map a flat ``(dim,)`` vector to a pytree shaped like ``params`` (``None`` in
        place of leaves that ``wrt=`` left out)."""
        return unraveler(*self.layout)

    def ravel(self, tree: PyTree) -> jax.Array:
        """Map a params-shaped pytree to a flat ``(dim,)`` vector (``ravel_pytree`` order;
        for a block, the full params shape is accepted too and its selected leaves kept);
        ``ValueError`` for a pytree of another structure or other leaf shapes."""
        if self.select is not None:
            full = jax.tree_util.tree_structure(self.params)
            if jax.tree_util.tree_structure(tree) == full:
                leaves = jax.tree_util.tree_leaves(tree)
                pairs = zip(leaves, self.select, strict=True)
                tree = full.unflatten([x if s else None for x, s in pairs])
        return ravel_checked(self.layout, tree, self.dtype)

    @property
    def dim(self) -> int:
        return int(sum(int(np.prod(s, dtype=np.int64)) for s, _ in self.layout[1]))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(jnp.result_type(*[d for _, d in self.layout[1]]))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    @property
    def traceable(self) -> bool:
        return self.loop == "scan"

    @property
    def kind(self) -> str:
        return self.product.kind

    @property
    def loss(self) -> Callable:
        """The batch loss ``loss(params, batch)`` as given (for a Gauss-Newton or Fisher
        operator: the loss on the model's outputs)."""
        return self.product.loss

    @property
    def _kernel(self) -> _Kernel:
        product = self.product
        if self.rewrite != "none":
            product = product.rewritten(self.rewrite == "onednn")
        return _Kernel(product, self.select)

    @property
    def product_loss(self) -> Callable:
        """The loss as the products evaluate it: through
        :func:`jax_spectral.rewrite.cpu_friendly` unless ``rewrite="none"``."""
        return self._kernel.product.evaluated_loss

    # -- products ---------------------------------------------------------------------
    def matvec(self, v: jax.Array) -> jax.Array:
        """``C v`` for a flat vector ``v`` of shape ``(dim,)``; returns shape ``(dim,)``."""
        v = check_vector(v, self.dim)
        tangent = jax.tree_util.tree_leaves(self.unravel(v.astype(self.dtype)))
        if self.stream is not None:
            return self._stream_matvec(tangent)
        if self.loop == "host":
            return self._host_matvec(tangent)
        return _jitted_scan_matvec(self, tangent)

    __call__ = matvec

    def matmat(self, vectors: jax.Array, *, chunk: int | None = None) -> jax.Array:
        """``C v`` for each row of ``vectors`` (shape ``(k, dim)``), in one pass over the
        data: each batch is read once and serves all ``k`` tangents.

        Each batch's product is linearised once and applied to ``chunk`` tangents at a
        time (vmapped), so the working memory grows with ``chunk``, not with ``k``. The
        default is :func:`tangent_chunk`'s: as many as fit in about one tangent's working
        memory (at least 64 MiB), and in the free memory (see docs/design.md).
        """
        vectors = check_vectors(vectors, self.dim)
        chunk = tangent_chunk(self, vectors.shape[0]) if chunk is None else count("chunk", chunk)
        tangent = jax.tree_util.tree_leaves(jax.vmap(self.unravel)(vectors.astype(self.dtype)))
        if self.stream is not None:
            return self._stream_matvec(tangent, chunk)
        if self.loop == "host":
            return self._host_matvec(tangent, chunk)
        return _jitted_scan_matvec(self, tangent, chunk)

    def matvec_tree(self, v: PyTree) -> PyTree:
        """``C v`` for a params-shaped pytree ``v``; returns a params-shaped pytree."""
        return self.unravel(self.matvec(self.ravel(v)))

    def _weights(self) -> tuple[float, float, float]:
        """Weights of a full batch, of the remainder batch and of its tail in the
        reduction."""
        if self.reduce == "sum":
            return 1.0, 1.0, 1.0
        tail = 0 if self.tail is None else batch_size_of(self.tail)
        rest = self.num_samples % self.batch_size - tail
        return self.batch_size / self.num_samples, rest / self.num_samples, tail / self.num_samples

    def _zero_tangent(self) -> list:
        return jax.tree_util.tree_leaves(self.unravel(jnp.zeros((self.dim,), self.dtype)))

    def linearized(self, budget: int | None = None) -> CurvatureOperator:
        """The same operator with each batch's product linearised once, for runs of many
        products (Lanczos, SLQ, trace estimates): the forward and backward passes of the
        loss, which do not depend on the vector, run here once per batch, and each later
        product runs only the passes of its vector (about a quarter less time a product
        for a convnet, ``docs/benchmarks.md``). What those passes need is kept in memory
        for every batch: the activations, and copies of the weights the vector's passes use
        (:meth:`linearized_bytes`; for an MLP of 0.57 MB in 128 batches, 71 MB). Functions
        the loss calls back to the host (``jax.debug.callback``) then run once per batch
        and run, not once per product.

        Returns ``self`` unchanged where this does not apply or does not fit: a stream (its
        batches are read anew each pass), an operator on a mesh, or linearisations larger
        than ``budget`` bytes (default: ``LINEARIZE_FRACTION`` of the device's free
        memory). The products are equal to rounding; the matrix is the same.
        """
        if self.linear is not None or not self._linearizable():
            return self
        if budget is None:
            free = free_device_bytes()
            budget = 0 if free is None else int(LINEARIZE_FRACTION * free)
        if self.linearized_bytes() > budget:
            return self
        if self.loop == "host":
            zero = self._zero_tangent()
            stacked = None
            if self.stacked is not None:
                num = jax.tree_util.tree_leaves(self.stacked)[0].shape[0]
                stacked = tuple(
                    _linearize_index(self._kernel, self.params, self.stacked, i, zero)
                    for i in range(num)
                )
            rest = [
                None if b is None else _linearize_step(self._kernel, self.params, b, zero)
                for b in (self.remainder, self.tail)
            ]
            linear = (stacked, *rest)
        else:
            linear = _linearize_scanned(self)
        return dataclasses.replace(self, linear=linear)

    def gradient(self, *, per_batch: bool = False) -> jax.Array:
        """The gradient of the dataset loss that this operator's matrix is the curvature
        of, as a flat ``(dim,)`` vector over the differentiated leaves: each batch's
        gradient weighted as the matrix weighs its batch (``reduce``: the exact sample
        mean, or the sum). ``per_batch=True``: the ``(num_batches, dim)`` gradients of the
        batches' own losses (the mini-batch gradients an optimiser sees), in data order.
        The loss is evaluated as the products evaluate it (``product_loss``)."""
        parts, weights = [], []
        if self.stream is not None:
            sizes = []
            for batch in self.stream:
                parts.append(_batch_gradient(self, batch)[None])
                sizes.append(batch_size_of(batch))
            weights = [n / sum(sizes) if self.reduce == "mean" else 1.0 for n in sizes]
        else:
            w_full, w_rest, w_tail = self._weights()
            if self.stacked is not None:
                parts.append(_stacked_gradients(self))
                weights += [w_full] * parts[-1].shape[0]
            rest = [(self.remainder, w_rest), (self.tail, w_tail)]
            rest = [(batch, w) for batch, w in rest if batch is not None]
            if len(rest) == 2:  # a remainder cut for a mesh: its two parts are one batch
                (head, w_head), (tail, w_tail) = rest
                joined = w_head * _batch_gradient(self, head) + w_tail * _batch_gradient(self, tail)
                norm = w_head + w_tail if self.reduce == "mean" else 1.0
                parts.append((joined / norm)[None])
                weights.append(norm)
            elif rest:
                parts.append(_batch_gradient(self, rest[0][0])[None])
                weights.append(rest[0][1])
        batches = jnp.concatenate(parts)
        if per_batch:
            return batches.astype(self.dtype)
        return (jnp.asarray(weights, batches.dtype) @ batches).astype(self.dtype)

    def _linearizable(self) -> bool:
        if self.stream is not None:
            return False
        leaves = jax.tree_util.tree_leaves((self.params, self.stacked, self.remainder))
        return not any(
            len(getattr(getattr(x, "sharding", None), "device_set", ())) > 1 for x in leaves
        )

    def linearized_bytes(self) -> int | None:
        """The memory :meth:`linearized` keeps (``None`` for a stream)."""
        if self.stream is not None:
            return None
        if self.linear is not None:
            leaves = jax.tree_util.tree_leaves(self.linear)
        elif self.loop == "host":  # compiled per batch: one batch's, times the batches
            return _host_linear_bytes(self)
        else:
            leaves = jax.eval_shape(_linearize_scanned, self)
        return _tree_bytes(leaves)

    @property
    def _sum_dtype(self) -> np.dtype:
        """The dtype of the sums over batches: the parameters' promoted to float32."""
        return np.dtype(jnp.promote_types(self.dtype, jnp.float32))

    def _zeros(self, tangent: PyTree) -> tuple[PyTree, jax.Array]:
        def zeros(t):  # also for a list of chunks
            return jnp.zeros(jnp.shape(t), jnp.promote_types(t.dtype, jnp.float32))

        return jax.tree_util.tree_map(zeros, tangent), jnp.zeros((), self._sum_dtype)

    def _scan_matvec(self, tangent: PyTree, chunk: int | None = None) -> jax.Array:
        """The product over in-memory batches as one compiled loop; ``chunk``: tangents
        have a leading axis, applied ``chunk`` at a time (see :func:`_accumulate_some`)."""
        w_full, w_rest, w_tail = (jnp.asarray(w, self._sum_dtype) for w in self._weights())
        acc, loss_sum = self._zeros(tangent)
        kernel, params = self._kernel, self.params
        if self.linear is not None:
            stacked, remainder, tail = self.linear
            if stacked is not None:

                def apply(carry, batch):
                    linear, value = batch
                    return _apply_linear(linear, tangent, *carry, w_full, value, chunk), None

                (acc, loss_sum), _ = jax.lax.scan(apply, (acc, loss_sum), stacked)
            for linear, weight in ((remainder, w_rest), (tail, w_tail)):
                if linear is not None:
                    acc, loss_sum = _apply_linear(
                        linear[0], tangent, acc, loss_sum, weight, linear[1], chunk
                    )
            return _finish(acc, loss_sum, 1.0, self.dtype, chunk is not None)
        if self.stacked is not None:

            def body(carry, batch):
                return _accumulate_some(kernel, params, batch, tangent, *carry, w_full, chunk), None

            (acc, loss_sum), _ = jax.lax.scan(body, (acc, loss_sum), self.stacked)
        for batch, weight in ((self.remainder, w_rest), (self.tail, w_tail)):
            if batch is not None:
                acc, loss_sum = _accumulate_some(
                    kernel, params, batch, tangent, acc, loss_sum, weight, chunk
                )
        return _finish(acc, loss_sum, 1.0, self.dtype, chunk is not None)

    def _host_matvec(self, tangent: PyTree, chunk: int | None = None) -> jax.Array:
        """The product over in-memory batches from a host loop, one program per batch."""
        w_full, w_rest, w_tail = (jnp.asarray(w, self._sum_dtype) for w in self._weights())
        acc, loss_sum = self._zeros(tangent)
        kernel = self._kernel
        if self.linear is not None:
            stacked, remainder, tail = self.linear
            batches = [(b, w_full) for b in stacked or ()] + [(remainder, w_rest), (tail, w_tail)]
            for linear, weight in batches:
                if linear is not None:
                    acc, loss_sum = _linear_step(
                        linear[0], tangent, acc, loss_sum, weight, linear[1], chunk
                    )
            return _finish(acc, loss_sum, 1.0, self.dtype, chunk is not None)
        if self.stacked is not None:
            num_full = jax.tree_util.tree_leaves(self.stacked)[0].shape[0]
            for i in range(num_full):
                acc, loss_sum = _stacked_step(
                    kernel, self.params, self.stacked, i, tangent, acc, loss_sum, w_full, chunk
                )
        for batch, weight in ((self.remainder, w_rest), (self.tail, w_tail)):
            if batch is not None:
                acc, loss_sum = _batch_step(
                    kernel, self.params, batch, tangent, acc, loss_sum, weight, chunk
                )
        return _finish(acc, loss_sum, 1.0, self.dtype, chunk is not None)

    def _stream_matvec(self, tangent: PyTree, chunk: int | None = None) -> jax.Array:
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tangent)):
            raise HostOnlyError(
                "this operator reads its batches from the host and cannot be traced (jit, "
                "vmap, lax.scan would compile the whole dataset into the program); call "
                "matvec outside transformations, or use in-memory arrays with batch_size."
            )
        acc, loss_sum = self._zeros(tangent)
        content = StreamContent()
        for batch in self.stream:
            n = batch_size_of(batch)
            weight = jnp.asarray(n if self.reduce == "mean" else 1, self._sum_dtype)
            acc, loss_sum = _batch_step(
                self._kernel, self.params, batch, tangent, acc, loss_sum, weight, chunk
            )
            content.add(batch)
        self._check_pass(content.finish())
        scale = 1.0 / content.num_samples if self.reduce == "mean" else 1.0
        scale = jnp.asarray(scale, self._sum_dtype)
        return _finish(acc, loss_sum, scale, self.dtype, chunk is not None)

    def _check_pass(self, content: StreamContent) -> None:
        """Refuse a pass that applied another matrix than the first pass did."""
        reference = self.stream.content
        if content.num_samples == 0:
            raise ValueError(
                "the data yielded no batches on this pass"
                + (" although an earlier pass had data" if reference else "")
                + ". Lanczos needs one full pass per step: pass a re-iterable (a list of "
                "batches, a callable returning a fresh iterator, or a tf.data.Dataset), "
                "not a one-shot iterator or generator."
            )
        if reference is None:
            self.stream.content = content
            return
        if content.batches == reference.batches:
            return  # the same batches, perhaps in another order: the same sum
        fix = (
            " Lanczos needs the same matrix on every pass: fix the order (drop shuffle, or "
            "give it a fixed seed and reshuffle_each_iteration=False), take the subset once "
            "before the pass loop, or pass in-memory arrays with batch_size."
        )
        if content.samples != reference.samples:
            raise ValueError(
                f"the data changed between passes: this pass read {content.num_samples} "
                f"samples in {content.num_batches} batches, not the same samples as the first "
                f"pass ({reference.num_samples} in {reference.num_batches}); a random subset "
                "per pass, or shuffle() before take(), does this." + fix
            )
        form = self.loss_form()
        equal = content.batch_sizes == reference.batch_sizes and len(content.batch_sizes) == 1
        if form is None or (form != self.reduce and not equal):
            raise ValueError(
                "the data was reshuffled between passes (the same samples, grouped into "
                "other batches), and the loss is not a per-sample sum or mean: it depends on "
                "which samples share a batch (batch statistics, as batch normalisation in "
                "training mode computes), so each pass applied another matrix." + fix
                if form is None
                else f"the data was reshuffled between passes, the batches differ in size and "
                f"the loss of a batch is the {form} of its samples' losses, so reduce="
                f"{self.reduce!r} weighs a sample by the size of the batch it fell in; "
                f"each pass applied another matrix. Use reduce={form!r}, or:" + fix
            )

    def loss_form(self) -> str | None:
        """``"mean"`` or ``"sum"`` when the loss of a batch is the mean or the sum of its
        samples' losses, ``None`` when it depends on which samples share a batch; tested
        on a batch of the stream split in two (loss and gradient against the halves').
        Cached on the stream."""
        if self.stream.loss_form is None:
            self.stream.loss_form = _loss_form(Unwrapping(self.loss), self.params, self.stream)
        return self.stream.loss_form or None


def _loss_form(loss: Callable, params: PyTree, batches: Any) -> str:
    """See :meth:`CurvatureOperator.loss_form` (tested on the first batch of ``batches``
    with more than one sample); ``""`` for neither form."""
    batch = next((b for b in batches if batch_size_of(b) > 1), None)
    if batch is None:
        return "mean"  # single-sample batches: any regrouping gives the same batches
    n = batch_size_of(batch)
    m = n // 2
    # the loss, its gradient and a Hessian-vector product: a batch term may show in second
    # derivatives only (a penalty on a batch mean where its value and gradient vanish)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    tangent = treedef.unflatten(_fixed_tangent(leaves))

    @jax.jit
    def value_and_grad(params, batch):
        def grad(p):
            return jax.value_and_grad(loss)(p, batch)

        (value, gradient), (_, hvp) = jax.jvp(grad, (params,), (tangent,))
        return value, gradient, hvp

    parts = (batch, _samples(batch, n, 0, m), _samples(batch, n, m, n))
    try:
        outs = [value_and_grad(params, b) for b in parts]
        narrowest = _narrowest_float(jax.make_jaxpr(loss)(params, batch).jaxpr)
    except Exception:  # noqa: BLE001 - e.g. a loss written for one batch size: not per-sample
        return ""
    for form in ("mean", "sum"):
        if _parts_combine(outs, (m, n - m), form, narrowest):
            return form
    return ""


def _samples(batch: PyTree, n: int, lo: int, hi: int) -> PyTree:
    """Samples ``lo .. hi - 1`` of a batch of ``n``: the leaves with that sample axis
    sliced, any other leaf (a per-batch value) whole."""
    return jax.tree_util.tree_map(
        lambda a: a[lo:hi] if np.ndim(a) and np.shape(a)[0] == n else a, batch
    )


def _fixed_tangent(leaves: list) -> list:
    """One standard-normal tangent per leaf, in the leaf's dtype, the same on every call
    and every process (the regrouping tests' direction)."""
    keys = jax.random.split(jax.random.key(20191), len(leaves))
    return [
        jax.random.normal(
            k, np.shape(x), jnp.promote_types(jnp.result_type(x), jnp.float32)
        ).astype(jnp.result_type(x))
        for k, x in zip(keys, leaves, strict=True)
    ]


def _parts_combine(outs: list, sizes: tuple, form: str, narrowest: Any) -> bool:
    """Whether a batch's results ``outs[0]`` are the ``form`` (``"mean"``, weighted by
    the parts' sample counts ``sizes``, or ``"sum"``) of its two parts' ``outs[1]`` and
    ``outs[2]``. Each is a tuple of blocks (the loss, a gradient, a product), each block
    compared to the rounding of the narrowest float type the loss computes in, relative to
    the block's norm (a bf16 loss on float32 parameters rounds at 4e-3; a batch dependence
    is far larger)."""
    tol = min(1000 * float(jnp.finfo(narrowest).eps), 0.05)
    a, b = sizes
    for blocks in zip(*outs, strict=True):
        whole, first, second = (
            np.concatenate(
                [np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(block)]
            )
            for block in blocks
        )
        combined = (a * first + b * second) / (a + b) if form == "mean" else first + second
        scale = np.linalg.norm(np.abs(whole) + np.abs(first) + np.abs(second))
        if np.any(np.abs(whole - combined) > tol * scale):
            return False
    return True


def _narrowest_float(jaxpr) -> Any:
    """The float dtype with the largest epsilon among the values of ``jaxpr`` (nested
    jaxprs included); float64 if there is none."""
    dtypes = [
        np.dtype(var.aval.dtype)
        for eqn in all_equations(jaxpr)
        for var in eqn.outvars
        if jnp.issubdtype(getattr(var.aval, "dtype", np.int8), jnp.floating)
    ]
    return max(dtypes, key=lambda d: float(jnp.finfo(d).eps), default=np.dtype(np.float64))


@functools.partial(jax.jit, static_argnums=2)
def _jitted_scan_matvec(
    operator: CurvatureOperator, tangent: PyTree, chunk: int | None = None
) -> jax.Array:
    # The operator is a pytree argument: its arrays are inputs, not compiled-in constants.
    return operator._scan_matvec(tangent, chunk)


def _host_linear_bytes(operator: CurvatureOperator) -> int:
    """:meth:`CurvatureOperator.linearized_bytes` of a host-loop operator: one batch's
    linearisation (from shapes) times the batches."""
    zero = operator._zero_tangent()
    total = 0
    if operator.stacked is not None:
        num = jax.tree_util.tree_leaves(operator.stacked)[0].shape[0]
        one = jax.eval_shape(
            _linearize_index, operator._kernel, operator.params, operator.stacked, 0, zero
        )
        total += num * _tree_bytes(one)
    for batch in (operator.remainder, operator.tail):
        if batch is not None:
            one = jax.eval_shape(_linearize_step, operator._kernel, operator.params, batch, zero)
            total += _tree_bytes(one)
    return total


def _tree_bytes(tree: PyTree) -> int:
    leaves = jax.tree_util.tree_leaves(tree)
    return int(sum(np.prod(x.shape, dtype=np.int64) * x.dtype.itemsize for x in leaves))


TANGENT_MEMORY_FLOOR = 64 * 2**20  # bytes a chunk of tangents may always use


def tangent_chunk(operator: CurvatureOperator, num: int) -> int:
    """How many of ``num`` tangents one vmapped product takes (``matmat``'s default).

    As many as fit in the working memory of one tangent's product on one batch, or in
    ``TANGENT_MEMORY_FLOOR`` if that is larger (small models: all tangents at once), and
    in the usable free memory of the device. The working memory is XLA's own figure for
    the compiled one-batch product (compiled once per operator layout, from shapes only),
    so the products of ``k`` probes take about twice the memory of one, whatever ``k``.
    Streams (no batch to compile before reading one) take ``HOST_TANGENT_CHUNK``.
    """
    if num <= 1:
        return 1
    per_tangent = _tangent_bytes(operator)
    if per_tangent is None:
        return min(num, HOST_TANGENT_CHUNK)
    budget = max(TANGENT_MEMORY_FLOOR, per_tangent)
    free = free_device_bytes()
    if operand_mesh(operator) is not None:  # one compiled chunk on every process
        free = smallest(free)
    if free is not None:
        budget = min(budget, USABLE_FRACTION * free)
    return int(max(1, min(num, budget // max(per_tangent, 1))))


def _tangent_bytes(operator: CurvatureOperator) -> int | None:
    """XLA's temporary bytes for one tangent's product on one batch (``None`` when the
    operator has no in-memory batch or the backend does not say)."""

    def shape(x, drop=0):
        return jax.ShapeDtypeStruct(jnp.shape(x)[drop:], jnp.result_type(x))

    if operator.stacked is not None:
        batch = jax.tree_util.tree_map(lambda a: shape(a, 1), operator.stacked)
    elif operator.remainder is not None:
        batch = jax.tree_util.tree_map(shape, operator.remainder)
    else:
        return None
    vector = jax.ShapeDtypeStruct((operator.dim,), operator.dtype)
    tangent = jax.tree_util.tree_leaves(jax.eval_shape(operator.unravel, vector))
    leaves, treedef = jax.tree_util.tree_flatten((operator.params, batch, tangent))
    return _compiled_bytes(operator._kernel, treedef, tuple(map(shape, leaves)))


@functools.lru_cache(maxsize=64)
def _compiled_bytes(kernel: Any, treedef: Any, leaves: tuple) -> int | None:
    """The temporary bytes XLA allocates for ``kernel`` on arguments of these shapes."""
    params, batch, tangent = jax.tree_util.tree_unflatten(treedef, leaves)
    try:
        compiled = jax.jit(lambda *args: kernel(*args)[1]).lower(params, batch, tangent).compile()
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # a backend without memory analysis: the caller falls back
        return None


def all_equations(jaxpr) -> Iterator[Any]:
    """Every equation of ``jaxpr``, each followed by those of the jaxprs nested in its
    parameters (loop bodies, branches, custom-derivative and pjit calls)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from all_equations(inner)


def _primitive_names(jaxpr) -> Iterator[str]:
    return (eqn.primitive.name for eqn in all_equations(jaxpr))


def check_auto_mesh(mesh) -> None:
    """Sharded runs let XLA place the reductions: the mesh's axes must be ``Auto``."""
    types = getattr(mesh, "axis_types", ())
    if any(t != jax.sharding.AxisType.Auto for t in types):
        raise ValueError(
            f"the mesh's axes are {types}; jax-spectral needs Auto axes, e.g. "
            "jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))."
        )


def _shard_data(mesh, axis, params, split, settings):
    """Parameters replicated; batches split along their sample axis over ``axis``; of
    the remainder, what divides the devices split likewise and its tail replicated
    (:func:`_cut_tail`). Returns the parameters, stacked batches, remainder and tail."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if axis not in mesh.axis_names:
        raise ValueError(f"mesh has axes {mesh.axis_names}, not {axis!r}.")
    check_auto_mesh(mesh)
    devices = mesh.shape[axis]
    if split.stacked is not None and split.batch_size % devices:
        raise ValueError(
            f"the batch size {split.batch_size} (batch_size, or the size of a list's batches) "
            f"is not a multiple of the {devices} devices on mesh axis {axis!r}; each device "
            "takes an equal part of every batch."
        )
    split, tail = _cut_tail(split, devices, params, settings, several=False)
    replicated = NamedSharding(mesh, P())
    params = place_params(mesh, params)
    stacked = remainder = None
    if split.stacked is not None:
        stacked = jax.device_put(split.stacked, NamedSharding(mesh, P(None, axis)))
    if split.remainder is not None:
        spec = P(axis) if batch_size_of(split.remainder) % devices == 0 else P()
        remainder = jax.device_put(split.remainder, NamedSharding(mesh, spec))
    if tail is not None:
        tail = jax.device_put(tail, replicated)
    return params, stacked, remainder, tail


def place_params(mesh, params):
    """The parameters on ``mesh``: a leaf already laid out over it (split over a model
    axis, FSDP-style, or over any of its axes) keeps its layout, so a model too large for
    one device stays split; every other leaf is replicated."""
    from jax.sharding import PartitionSpec as P

    def placed(leaf):
        sharding = getattr(leaf, "sharding", None)
        return isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh == mesh

    leaves, treedef = jax.tree_util.tree_flatten(params)
    others = [leaf for leaf in leaves if not placed(leaf)]
    if process_count(mesh) > 1:  # each process provides its copy
        others = iter(replicate(mesh, others))
    else:
        others = iter(jax.device_put(others, jax.sharding.NamedSharding(mesh, P())))
    return treedef.unflatten([leaf if placed(leaf) else next(others) for leaf in leaves])


def _cut_tail(split, devices, params, settings, *, several):
    """The remainder batch cut where a multiple of ``devices`` samples ends: that part is
    split over the devices like every batch, and the few samples after it (the tail,
    returned second) are computed whole on every device. Cutting regroups samples, so it
    is done only when the two parts give the remainder's own product: the operator's
    product (and loss) of the remainder against the parts', weighted as the reduction
    weighs them, for a random tangent (:func:`_same_product`). A loss with batch
    statistics (batch normalisation in training mode, a penalty on a batch mean), or a
    per-batch leaf that is not a sample axis, keeps its remainder whole, replicated.
    ``several``: the processes agree on the outcome."""
    if split.remainder is None:
        return split, None
    rest = batch_size_of(split.remainder)
    cut = rest - rest % devices
    if cut in (0, rest):
        return split, None

    head = _samples(split.remainder, rest, 0, cut)  # a per-batch leaf goes into both parts
    tail = _samples(split.remainder, rest, cut, rest)
    regroups = _same_product(params, settings, split.remainder, head, tail)
    if several:
        regroups = bool(np.all(all_ok(regroups)))
    if not regroups:
        return split, None
    return split._replace(remainder=head), tail


def _same_product(params, settings, whole, head, tail) -> bool:
    """Whether the product of ``whole`` equals its parts' (``head``, ``tail``), the mean
    weighted by their sizes for ``reduce="mean"``, the sum for ``"sum"``, for a random
    tangent, to the rounding of the narrowest float type the loss computes in. The loss
    and its gradient alone would miss a batch coupling that only second derivatives show
    (a penalty on a batch mean at a point where its value and gradient vanish)."""
    product, reduce, select = settings[0], settings[1], settings[5]
    apply = jax.jit(_Kernel(product, select))
    tangent = _fixed_tangent(jax.tree_util.tree_leaves(_block(params, select)))
    try:
        outs = [apply(params, batch, tangent) for batch in (whole, head, tail)]
        narrowest = _narrowest_float(jax.make_jaxpr(Unwrapping(product.loss))(params, whole).jaxpr)
    except Exception:  # noqa: BLE001 - e.g. a loss written for one batch size
        return False
    sizes = (batch_size_of(head), batch_size_of(tail))
    return _parts_combine(outs, sizes, reduce, narrowest)


def process_count(mesh) -> int:
    """How many processes own devices of ``mesh`` (more than 1 on several hosts, after
    ``jax.distributed.initialize()``)."""
    return len({d.process_index for d in mesh.devices.flat})


def _local_batch_size(batch_size: int | None, mesh: Any) -> int | None:
    """The batch size of one process's share of the data: on a mesh over ``n``
    processes, each passes its own samples and contributes ``batch_size / n`` of every
    batch."""
    processes = 1 if mesh is None else process_count(mesh)
    if batch_size is None or processes == 1:
        return batch_size
    if isinstance(batch_size, (int, np.integer)) and batch_size > 0 and batch_size % processes:
        raise ValueError(
            f"batch_size {batch_size} is not a multiple of the {processes} processes of the "
            "mesh; each process contributes an equal share of every batch."
        )
    return batch_size // processes if isinstance(batch_size, (int, np.integer)) else batch_size


def _shard_process_data(mesh, axis, params, split, settings):
    """The global operator data on a mesh over several processes, from each process's own
    share (``split``, cut with the local batch size): every batch is the processes'
    local batches side by side, split over ``axis``; the remainders likewise when each
    process's divides its devices, else gathered and replicated. The parameters are
    replicated, after checking that every process passed the same ones, the same
    settings and the same amount of data (a mismatch would deadlock or mix runs)."""
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if axis not in mesh.axis_names:
        raise ValueError(f"mesh has axes {mesh.axis_names}, not {axis!r}.")
    check_auto_mesh(mesh)
    processes = process_count(mesh)
    local_devices = _data_devices_of_this_process(mesh, axis)
    rest = 0 if split.remainder is None else split.num_samples % split.batch_size
    _agree_across_processes(params, split, settings, rest)
    if split.stacked is not None and split.batch_size % local_devices:
        raise ValueError(
            f"each process's share of a batch ({split.batch_size} samples) is not a multiple "
            f"of its {local_devices} devices on mesh axis {axis!r}; each device takes an "
            "equal part of every batch."
        )

    def global_from_local(tree, spec):
        sharding = NamedSharding(mesh, spec)
        return jax.tree_util.tree_map(
            lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), tree
        )

    def everyones(tree):  # a few samples: every process holds all processes' samples
        return replicate(mesh, multihost_utils.process_allgather(tree, tiled=True))

    split, tail = _cut_tail(split, local_devices, params, settings, several=True)
    stacked = remainder = None
    if split.stacked is not None:
        stacked = global_from_local(split.stacked, P(None, axis))
    if split.remainder is not None:
        if batch_size_of(split.remainder) % local_devices == 0:
            remainder = global_from_local(split.remainder, P(axis))
        else:
            remainder = everyones(split.remainder)
    if tail is not None:
        tail = everyones(tail)
    params = place_params(mesh, params)
    global_split = split._replace(
        stacked=stacked,
        remainder=remainder,
        num_samples=split.num_samples * processes,
        batch_size=split.batch_size * processes,
    )
    return params, global_split, tail


def _data_devices_of_this_process(mesh, axis) -> int:
    """How many positions along the data axis this process owns. Each process's share of
    the data is one block of every batch, so each position must belong to one process
    (the other axes within it: a model axis across processes would make each process's
    share look like the whole batch) and each process's positions must be contiguous."""
    devices = np.moveaxis(mesh.devices, mesh.axis_names.index(axis), 0)
    owners = []
    for position in devices:
        procs = {d.process_index for d in np.ravel(position)}
        if len(procs) != 1:
            raise ValueError(
                f"mesh axis {axis!r} position {len(owners)} spans processes {sorted(procs)}: "
                f"on several processes, every other axis of the mesh ({mesh.axis_names}) "
                f"must lie within one process, and the processes along {axis!r}, so that "
                "each process's data is its own block of every batch."
            )
        owners.append(procs.pop())
    changes = sum(a != b for a, b in zip(owners, owners[1:], strict=False))
    counts = {owners.count(p) for p in set(owners)}
    if changes != len(set(owners)) - 1 or len(counts) > 1:
        raise ValueError(
            f"the processes own positions {owners} along mesh axis {axis!r}; each process's "
            "positions must be contiguous and as many as every other's (as jax.make_mesh "
            "lays them out), since each passes an equal share of the data."
        )
    return owners.count(jax.process_index())


def _agree_across_processes(params, split, settings, rest) -> None:
    """Refuse, on every process, a run whose processes passed different parameters,
    settings or amounts of data."""

    from .checkpoint import fingerprint

    def comparable(leaf):
        """A leaf as this process sees it: a global array by its layout, and by the
        values of its local pieces where every process holds the same pieces (replicated
        across processes), which must then be equal."""
        if getattr(leaf, "is_fully_addressable", True):
            return leaf
        layout = repr((leaf.shape, str(leaf.dtype), leaf.sharding.spec))
        pieces: dict = {}
        for device, index in leaf.sharding.devices_indices_map(leaf.shape).items():
            pieces.setdefault(device.process_index, set()).add(repr(index))
        if len({frozenset(p) for p in pieces.values()}) > 1:  # split across processes
            return layout
        local = {repr(s.index): s.data for s in leaf.addressable_shards}
        return layout, [np.asarray(local[k]) for k in sorted(local)]

    product, reduce, loop, layout, rewrite, select = settings
    mine = {
        "parameters and settings": fingerprint(
            (
                jax.tree_util.tree_map(comparable, params),
                repr((type(product).__name__, reduce, loop, rewrite, select)),
            )
        ),
        "number of samples": str(split.num_samples),
        "samples per batch": str(split.batch_size),
        "remainder": str(rest),
    }
    encoded = np.frombuffer(repr(sorted(mine.items())).encode().ljust(512)[:512], np.uint8)
    everyone = gather(encoded)
    differ = [i for i in range(everyone.shape[0]) if not np.array_equal(everyone[i], encoded)]
    if differ:
        raise ValueError(
            f"process {jax.process_index()} and process(es) {differ} passed different "
            f"parameters, settings or amounts of data to the operator ({mine}); every "
            "process passes the same parameters and settings and an equal share of the data."
        )


def _refuse_arrays_as_batches(data: Any) -> None:
    """A list of bare arrays with one sample count and unequal shapes is ``[X, y]`` meant
    as one dataset, not a list of batches (each array would be read as a batch)."""
    if not isinstance(data, list) or len(data) < 2 or not all(map(is_array_data, data)):
        return
    if not all(hasattr(a, "shape") and np.ndim(a) for a in data):
        return
    shapes = [tuple(np.shape(a)) for a in data]
    if len({s[0] for s in shapes}) == 1 and len(set(shapes)) > 1:
        raise ValueError(
            f"data is a list of {len(data)} arrays of shapes {shapes}: a list is read as a "
            "list of batches, each array one batch. For one dataset of inputs and targets "
            "pass a tuple, (X, y), with batch_size= to cut it into batches."
        )


def first_batch(stacked: PyTree | None, remainder: PyTree | None) -> PyTree:
    """The first batch of in-memory data: the first stacked batch, else the remainder."""
    if stacked is not None:
        return jax.tree_util.tree_map(lambda a: a[0], stacked)
    return remainder


def _choose_loop(loss: Callable, params: PyTree, batch: PyTree) -> str:
    """``"host"`` on CPU for a loss whose products keep XLA convolutions, ``"scan"``
    otherwise (measured; ``loss`` is the loss as the products evaluate it)."""
    if jax.default_backend() != "cpu":
        return "scan"
    jaxpr = jax.make_jaxpr(loss)(params, batch).jaxpr
    return "host" if _SLOW_IN_LOOP_ON_CPU & set(_primitive_names(jaxpr)) else "scan"


def _resolve_rewrite(rewrite: str, mesh: Any) -> str:
    """The stored setting: ``"onednn"``, ``"patches"`` or ``"none"``."""
    if rewrite == "auto":
        rewrite = "cpu" if jax.default_backend() == "cpu" else "none"
    if rewrite == "cpu":
        # One oneDNN call cannot be split across devices (XLA would gather its operands).
        return "onednn" if mesh is None and convolutions() == "onednn" else "patches"
    if rewrite == "onednn" and convolutions() != "onednn":
        raise ValueError(
            "rewrite='onednn' needs oneDNN, which was not found: pip install "
            "'jax-spectral[onednn]' (Linux x86-64), or use rewrite='cpu'."
        )
    return rewrite


def _applied_rewrite(product: Any, rewrite: str, params: PyTree, batch: PyTree) -> str:
    """What the rewrite ``rewrite`` actually changes in the product's function on this
    batch: ``"onednn"`` (some convolution runs on oneDNN), ``"patches"`` (rewritten
    without oneDNN) or ``"none"`` (nothing to rewrite, as in an MLP)."""
    if rewrite == "none":
        return rewrite
    fn, args = product.rewrite_target(params, batch)
    return rewrites(fn, *args, onednn=rewrite == "onednn")


def hessian_operator(
    loss: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    data: Any,
    *,
    reduce: str = "mean",
    batch_size: int | None = None,
    loop: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str = "data",
    rewrite: str = "auto",
    wrt: Any = None,
) -> CurvatureOperator:
    """The Hessian of the loss over a whole dataset, as a linear operator.

    Parameters
    ----------
    loss:
        ``loss(params, batch) -> scalar``, the loss of one batch (usually its mean).
    params:
        Pytree of real floating arrays at which the Hessian is taken.
    data:
        In-memory arrays (an array, or a tuple/dict of arrays sharing a leading sample
        axis), cut into batches of ``batch_size`` (all samples in one batch if ``None``);
        or a re-iterable of batches: a list of batches such as ``[(x, y), ...]``, a
        callable returning a fresh iterator on each call, or a ``tf.data.Dataset``. A list
        of in-memory batches of one structure, equal in size but for a smaller last one, is
        stacked once and runs like in-memory arrays (each batch kept whole); other lists and
        re-iterables are read from the host on every pass. ``tf.Tensor`` and other
        array-like leaves are converted with ``numpy.asarray``.
    reduce:
        ``"mean"``: the exact mean over samples, each batch weighted by its sample count;
        ``"sum"``: the sum of the per-batch Hessians.
    batch_size:
        Batch size for in-memory arrays; must be ``None`` for a re-iterable.
    loop:
        ``"scan"`` (in-memory only; the operator is traceable), ``"host"`` (a Python loop
        over batches with a jitted per-batch step), or ``"auto"`` (see the module notes).
    mesh, data_axis:
        Data parallelism for in-memory arrays: each batch is split along its sample axis
        over the devices of ``mesh``'s axis ``data_axis`` (``batch_size`` must be a multiple
        of their number) and the parameters are replicated, except leaves already laid out
        over ``mesh`` (for example split over a model axis of a 2-D mesh), which keep
        their layout. Inside ``jit`` every device
        computes the HVP of its part of the batch and XLA reduces them across devices
        (the batch mean is a sum over all devices' samples). Of a remainder batch whose
        size is not a multiple, the largest multiple is split likewise and the few samples
        after it are computed whole on every device; where the loss has batch statistics
        (the product of the remainder is not the mean, or the sum for ``reduce="sum"``, of
        its parts' products) the remainder stays whole, replicated. The same code
        runs on several hosts after ``jax.distributed.initialize()``, with a mesh over all
        processes' devices.
    rewrite:
        ``"cpu"``: the products evaluate the loss through
        :func:`jax_spectral.rewrite.cpu_friendly`, with oneDNN's convolutions where oneDNN
        is installed and no ``mesh`` is given (stored as ``"onednn"``), else patch matrix
        products (stored as ``"patches"``); max pooling as strided-slice selections. Equal
        to float32 rounding, and faster for convnets on CPU (``docs/benchmarks.md``).
        ``"onednn"`` or ``"patches"``: that choice explicitly; ``"none"``: as written;
        ``"auto"``: ``"cpu"`` when JAX's default backend is the CPU, else ``"none"``.
    wrt:
        A block of the parameters (the others held fixed): a string (a whole key on a
        leaf's path, or the start of the path as ``jax.tree_util.keystr`` prints it), a list
        of strings (any of them), or a predicate ``wrt(path, leaf) -> bool``. ``None``: all
        parameters. See :func:`jax_spectral.operators.select_leaves`.

    Returns
    -------
    CurvatureOperator
        With ``matvec(v_flat) -> Hv_flat``, ``dim``, ``dtype``, ``ravel``, ``unravel``.

    Raises
    ------
    ValueError
        Unknown ``reduce``, ``loop`` or ``rewrite``; ``rewrite="onednn"`` without oneDNN;
        empty data; a one-shot iterator;
        a non-scalar loss; ``batch_size`` given with a re-iterable.
    TypeError
        A params leaf is integer or complex; ``data`` is of an unsupported type; ``loss``
        is unhashable.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> loss = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
    >>> X, y = jnp.eye(3), jnp.zeros(3)
    >>> op = hessian_operator(loss, jnp.zeros(3), (X, y), batch_size=2)
    >>> op.matvec(jnp.ones(3))  # 2 X^T X / N applied to ones
    Array([0.6666667, 0.6666667, 0.6666667], dtype=float32)
    """
    check_hashable(loss, "loss")  # the compiled products take it as a static argument
    return build_operator(
        HessianProduct(loss),
        params,
        data,
        reduce=reduce,
        batch_size=batch_size,
        loop=loop,
        mesh=mesh,
        data_axis=data_axis,
        rewrite=rewrite,
        wrt=wrt,
    )


HessianOperator = CurvatureOperator  # the name under which the Hessian operator shipped


def build_operator(
    product: Any,
    params: PyTree,
    data: Any,
    *,
    reduce: str = "mean",
    batch_size: int | None = None,
    loop: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str = "data",
    rewrite: str = "auto",
    wrt: Any = None,
    check_batch: Callable | None = None,
) -> CurvatureOperator:
    """The dataset-reduction engine behind every curvature operator: ``product`` (see
    :mod:`jax_spectral.products`) summed over the batches of ``data`` with exact MEAN or
    SUM weights, in-memory (scanned or host-driven) or streamed, on a mesh, with the CPU
    rewrite, restricted to the ``wrt`` block. Arguments as for :func:`hessian_operator`;
    ``check_batch(params, batch)`` validates the first batch (default: the loss is a
    scalar)."""
    for name, value, allowed in (
        ("reduce", reduce, _REDUCTIONS),
        ("loop", loop, _LOOPS),
        ("rewrite", rewrite, _REWRITES),
    ):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
    rewrite = _resolve_rewrite(rewrite, mesh)
    params = _checked_params(params)
    select = None if wrt is None else select_leaves(params, wrt)
    settings = (product, reduce, loop, _block_layout(params, select), rewrite, select)
    if check_batch is None:

        def check_batch(params, batch):
            check_scalar_loss(Unwrapping(product.loss), params, batch)

    if isinstance(data, list) and batch_size is not None:
        raise ValueError(
            "batch_size applies to in-memory arrays only; a list of batches already defines "
            "its batches."
        )
    # a list of equal in-memory batches (and a smaller last one) scans like arrays
    if is_array_data(data):
        split = split_arrays(data, _local_batch_size(batch_size, mesh))
    else:
        split = stack_batches(data)  # None (a stream) also when it would not fit in memory
        if mesh is not None and process_count(mesh) > 1 and not all(all_ok(split is not None)):
            split = None  # every process refuses below, as the one that could not stack
    if split is not None:
        return _in_memory(split, params, settings, mesh, data_axis, check_batch)
    if mesh is not None:
        raise ValueError(
            "mesh= applies to in-memory data: arrays with batch_size, or a list of batches "
            "of one structure, equal in size but for a smaller last one, that fits in "
            "memory; other lists and streams are read on one host."
        )
    return _streamed(data, params, settings, batch_size, check_batch)


def _checked_params(params: PyTree) -> PyTree:
    """``params`` as JAX arrays, checked, with a warning for float64 leaves without x64."""
    check_params(params)
    if not jax.config.jax_enable_x64 and any(
        getattr(x, "dtype", None) == np.float64 for x in jax.tree_util.tree_leaves(params)
    ):
        warnings.warn(
            "params hold float64 arrays but jax_enable_x64 is off, so the curvature is "
            "computed in float32. Enable it (jax.config.update('jax_enable_x64', True)) for "
            "float64.",
            UserWarning,
            stacklevel=4,
        )
    return jax.tree_util.tree_map(jnp.asarray, params)


def _block_layout(params: PyTree, select: tuple | None):
    """The layout of the vectors an operator on the ``select`` block of ``params`` takes."""
    return _layout(_block(params, select))


def _in_memory(split, params, settings, mesh, data_axis, check_batch) -> CurvatureOperator:
    """The operator over stacked batches and their remainder (sharded over ``mesh``);
    ``loop="auto"`` chosen by measurement on the first batch."""
    product, reduce, loop, layout, rewrite, select = settings
    stacked = jax.tree_util.tree_map(jnp.asarray, split.stacked)
    remainder = jax.tree_util.tree_map(jnp.asarray, split.remainder)
    tail = None
    if mesh is not None and process_count(mesh) > 1:
        params, split, tail = _shard_process_data(mesh, data_axis, params, split, settings)
        stacked, remainder = split.stacked, split.remainder
    elif mesh is not None:
        params, stacked, remainder, tail = _shard_data(mesh, data_axis, params, split, settings)
    first = first_batch(stacked, remainder)
    check_batch(params, first)
    rewrite = _applied_rewrite(product, rewrite, params, first)
    operator = CurvatureOperator(
        params,
        stacked,
        remainder,
        product,
        reduce,
        loop,
        split.num_samples,
        split.batch_size,
        None,
        layout,
        rewrite,
        select,
        tail,
    )
    if loop == "auto":
        loop = _choose_loop(operator.product_loss, params, first)
        operator = dataclasses.replace(operator, loop=loop)
    return operator


def _streamed(data, params, settings, batch_size, check_batch) -> CurvatureOperator:
    """The operator over a re-iterable of batches, read from the host on every pass."""
    product, reduce, loop, layout, rewrite, select = settings
    if batch_size is not None:
        raise ValueError(
            "batch_size applies to in-memory arrays only; a re-iterable of batches "
            f"({type(data).__name__}) already defines its batches."
        )
    if loop == "scan":
        raise ValueError(
            "loop='scan' needs in-memory arrays, or a list of equal in-memory batches (and "
            "at most a smaller last one); other re-iterables of batches are read from the "
            "host (loop='host' or 'auto')."
        )
    _refuse_arrays_as_batches(data)
    stream = BatchStream(data)
    first = stream.first()
    batch_size_of(first)  # a clear error now for a batch without a sample axis
    check_batch(params, first)
    rewrite = _applied_rewrite(product, rewrite, params, first)
    return CurvatureOperator(
        params, None, None, product, reduce, "host", None, None, stream, layout, rewrite, select
    )


def _block(params: PyTree, select: tuple | None) -> PyTree:
    """``params`` with ``None`` in place of the leaves ``select`` leaves out."""
    if select is None:
        return params
    leaves, treedef = jax.tree_util.tree_flatten(params)
    return treedef.unflatten([x if s else None for x, s in zip(leaves, select, strict=True)])


def _path_matches(path: tuple, name: str) -> bool:
    """A whole key of the path (a dict key, an attribute name, an index), or the start of
    the path as ``keystr`` prints it (``"['layer1']['w']"``): ``"Dense_1"`` is not
    ``"Dense_10"``."""
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    text = jax.tree_util.keystr(path)
    # a prefix ends at a key's boundary: "['Dense_1" is not the start of "['Dense_10']"
    return name in keys or (text.startswith(name) and text[len(name) : len(name) + 1] in "[.")


def select_leaves(params: PyTree, wrt: Any) -> tuple:
    """Per leaf of ``params``, whether ``wrt`` selects it: a string (a whole key on the
    leaf's path, such as ``"Dense_1"`` or ``"kernel"``, or the start of its path as
    ``jax.tree_util.keystr`` prints it, such as ``"['Dense_1']['kernel']"``), a list or
    tuple of strings (any of them), or a predicate ``wrt(path, leaf) -> bool`` on the key
    path (a tuple of keys) and the leaf. ``ValueError`` when it selects nothing, naming
    the paths there are."""
    paths = jax.tree_util.tree_leaves_with_path(params)
    if isinstance(wrt, str):
        wrt = [wrt]
    if isinstance(wrt, (list, tuple)):
        if not wrt or not all(isinstance(w, str) and w for w in wrt):
            raise TypeError(
                f"wrt must be a non-empty string, a list of them or a predicate, got {wrt!r}."
            )
        select = tuple(any(_path_matches(p, name) for name in wrt) for p, _ in paths)
    elif callable(wrt):
        select = tuple(bool(wrt(p, x)) for p, x in paths)
    else:
        raise TypeError(
            f"wrt must be a string, a list of strings or a predicate, got {type(wrt).__name__}."
        )
    if not any(select):
        shown = ", ".join(jax.tree_util.keystr(p) for p, _ in paths[:12])
        more = f" and {len(paths) - 12} more" if len(paths) > 12 else ""
        raise ValueError(f"wrt={wrt!r} selects no parameters; the leaves are {shown}{more}.")
    return select
