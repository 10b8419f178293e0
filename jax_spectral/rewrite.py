"""CPU-friendly rewrites of convolutions and max pooling, for fast gradients and HVPs.

On XLA's CPU backend the input and kernel gradients of a convolution run several times
slower than the forward pass (the kernel gradient is a convolution whose window is the
whole image), and a forward-over-reverse HVP contains several of each; max pooling's
derivative lowers to slow unfused ``select_and_gather`` code. :func:`cpu_friendly`
rewrites a function so that

* each eligible float32 ``lax.conv_general_dilated`` runs on oneDNN's convolution kernels
  (:mod:`jax_spectral.onednn`: forward, input-gradient and kernel-gradient primitives that
  differentiate into each other) when oneDNN is installed;
* any other eligible convolution becomes the same convolution written as matrix products
  (:func:`patch_conv`): the input is cut into window-sized patches (``im2col``) and
  multiplied by the kernel reshaped to a matrix. Autodiff of that form gives the kernel
  gradient as a product of patches and output cotangents, and the input gradient as a
  product followed by adding the patches back in place;
* each max pooling over non-overlapping windows (``reduce_window_max`` with stride equal
  to the window, no padding, at most ``MAX_POOL_WINDOW`` elements) becomes a selection
  over the input reshaped to one axis per window place (:func:`reshape_max_pool`), whose
  derivative is a masked sum and its transpose a masked broadcast, each one loop in XLA.

The patch products run over chunks of images (``lax.map``) sized so that one chunk's
patches take about ``PATCH_BYTES``; each chunk's patches are recomputed in the backward
pass (``jax.checkpoint``) rather than stored: a whole batch's patch matrix is the image
data times the window size (9x for 3x3) and would not stay in cache.

``benchmarks/bench_cnn_tf.py`` measures it on the original package's CIFAR CNN
(``docs/benchmarks.md``): HVPs several times faster, and fast inside ``lax.scan`` too,
where XLA's own convolution gradients are slower still (jax-ml/jax#12868).

The results are the same sums in another order: equal to the stock ones to float32
rounding (tests compare values, gradients and HVPs). Pooling sends the derivative to the
first maximal element of each window, as XLA's rule sends it to one. Rewritten: any
number of spatial dimensions (oneDNN: one to three), any dimension numbers, window
strides, kernel (rhs) dilation, non-negative padding; pooling of floating-point arrays.
Left to XLA: grouped or depthwise convolutions, input (lhs) dilation as in transposed
convolutions, negative padding, overlapping, padded or large-window pooling, integer or
boolean pooling, operations with empty inputs or outputs, and anything inside
``lax.scan``/``while``/``cond`` bodies, ``jax.checkpoint`` (remat) bodies or
custom-derivative functions. Calls to ``jit`` inside the function are inlined (their
sharding annotations are dropped).

:func:`jax_spectral.hessian_operator` applies the rewrite when JAX's default backend is
the CPU (``rewrite="auto"``); GPUs and TPUs keep the stock operations, whose vendor
kernels are fast.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import onednn as _dnnl
from ._jaxapi import ClosedJaxpr, Literal, Tracer, bind_equation

__all__ = [
    "MAX_POOL_WINDOW",
    "PATCH_BYTES",
    "affects",
    "convolutions",
    "cpu_friendly",
    "patch_conv",
    "reshape_max_pool",
    "rewrites",
]

PATCH_BYTES = 8 << 20  # one chunk's patch matrix (measured: 2-16 MiB on a 2-core CPU)
# Pooling windows of at most this many elements are rewritten: the selection has one step
# per element, and its HVP's trace and compile time grow with them (an 8x8 window: 0.8 s
# against XLA's 0.2 s; 16x16: 3.4 s).
MAX_POOL_WINDOW = 16
_INLINED_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call"})


def _chunk_size(batch: int, per_image: int) -> int:
    """The largest divisor of ``batch`` whose patches fit in ``PATCH_BYTES`` (at least 1)."""
    size = max(1, min(batch, PATCH_BYTES // max(per_image, 1)))
    while batch % size:
        size -= 1
    return size


def patch_conv(
    x: jax.Array,
    w: jax.Array,
    strides: tuple[int, ...],
    padding: tuple[tuple[int, int], ...],
    dilation: tuple[int, ...],
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """Convolution of ``x`` (``N, *spatial, C``) with ``w`` (``*window, C, O``) as chunked
    patch matrix products; returns ``N, *out_spatial, O`` (cross-correlation, as
    ``lax.conv_general_dilated``). ``padding`` is explicit ``(low, high)`` per spatial
    dimension and must be non-negative; ``dilation`` is the kernel dilation."""
    rank = x.ndim - 2
    window, channels, outputs = w.shape[:rank], w.shape[-2], w.shape[-1]
    x = jnp.pad(x, [(0, 0), *padding, (0, 0)])
    out = tuple(
        (x.shape[1 + d] - (window[d] - 1) * dilation[d] - 1) // strides[d] + 1 for d in range(rank)
    )
    kernel = w.reshape(-1, outputs)
    offsets = list(itertools.product(*(range(k) for k in window)))

    def chunk(images):
        columns = []
        for offset in offsets:
            start = (0, *(o * r for o, r in zip(offset, dilation, strict=True)), 0)
            limit = (
                images.shape[0],
                *(s + (n - 1) * t + 1 for s, n, t in zip(start[1:-1], out, strides, strict=True)),
                channels,
            )
            columns.append(lax.slice(images, start, limit, (1, *strides, 1)))
        patches = columns[0] if len(columns) == 1 else jnp.concatenate(columns, axis=-1)
        product = jnp.matmul(
            patches.reshape(-1, kernel.shape[0]),
            kernel,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
        return product.reshape(images.shape[0], *out, outputs)

    batch = x.shape[0]
    per_image = math.prod(out) * kernel.shape[0] * x.dtype.itemsize
    size = _chunk_size(batch, per_image)
    if size == batch:
        return chunk(x)
    # Recompute each chunk's patches in the backward pass instead of storing them all.
    chunks = lax.map(jax.checkpoint(chunk), x.reshape(batch // size, size, *x.shape[1:]))
    return chunks.reshape(batch, *chunks.shape[2:])


def reshape_max_pool(x: jax.Array, window: tuple[int, ...]) -> jax.Array:
    """Max pooling over non-overlapping windows (stride = window, no padding; trailing
    elements that fill no window are dropped, as in ``lax.reduce_window``). The input is
    reshaped so that each window has its own axes, and each output is its window's first
    largest element in row-major order (a NaN, once seen, wins), found by a running
    selection over the window's places. The derivative goes to that one element, as XLA's
    ``reduce_window`` rule sends it to one (the same one, except in a window holding a NaN,
    whose value is NaN either way: XLA's goes to the window's last element, this one to the
    first NaN): the tangent is the input's tangent kept where a mask marks that element
    and summed over the window's axes, and its transpose one masked broadcast. XLA fuses
    each into one loop, where ``reduce_window``'s rules lower to ``select_and_gather``/
    ``select_and_scatter`` and a selection over strided slices transposes to interior
    padding (on the CIFAR CNN's HVP: 105 against 65 ms)."""
    out = [n // k for n, k in zip(x.shape, window, strict=True)]
    x = x[tuple(slice(0, n * k) for n, k in zip(out, window, strict=True))]
    split = [d for n, k in zip(out, window, strict=True) for d in (n, k)]
    return _pool_windows(x.reshape(split), window)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _pool_windows(windows: jax.Array, window: tuple[int, ...]) -> jax.Array:
    """Max pooling of ``windows``: axes alternate output position and place in a window."""
    return _first_largest(windows, window)[0]


@_pool_windows.defjvp
def _pool_windows_jvp(window, primals, tangents):
    (windows,), (dwindows,) = primals, tangents
    best, place = _first_largest(windows, window)
    inside = tuple(range(1, 2 * len(window), 2))  # the axes of places in a window
    places = np.arange(math.prod(window), dtype=np.int32)  # row-major, on the window's axes
    first = jnp.expand_dims(place, inside) == places.reshape([d for k in window for d in (1, k)])
    kept = jnp.where(first, dwindows, jnp.zeros((), dwindows.dtype))
    return best, jnp.sum(kept, axis=inside, dtype=dwindows.dtype)


def _first_largest(windows: jax.Array, window: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Each window's first largest element in row-major order (a NaN, once seen, wins)
    and its place (row-major number in the window), by a running selection over the
    places; ``windows``' axes alternate output position and place in a window."""
    best = place = None
    for flat, offset in enumerate(itertools.product(*(range(k) for k in window))):
        index = tuple(i for o in offset for i in (slice(None), o))
        part = windows[index]
        if best is None:
            best, place = part, jnp.zeros(part.shape, jnp.int32)
            continue
        larger = (part > best) | (jnp.isnan(part) & ~jnp.isnan(best))
        best = jnp.where(larger, part, best)
        place = jnp.where(larger, jnp.int32(flat), place)
    return best, place


def _nonempty(eqn: Any) -> bool:
    """Every input and the output hold elements (XLA returns empty results itself)."""
    avals = [v.aval for v in (*eqn.invars, *eqn.outvars)]
    return all(math.prod(a.shape) > 0 for a in avals)


def _pool_eligible(eqn: Any) -> bool:
    params = eqn.params
    return (
        jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.floating)  # derivatives; dtype kept
        and _nonempty(eqn)
        and tuple(params["window_dimensions"]) == tuple(params["window_strides"])
        and math.prod(params["window_dimensions"]) <= MAX_POOL_WINDOW
        and all(d == 1 for d in params["base_dilation"])
        and all(d == 1 for d in params["window_dilation"])
        and all(lo == 0 and hi == 0 for lo, hi in params["padding"])
    )


def _conv_eligible(eqn: Any) -> bool:
    params = eqn.params
    return (
        _nonempty(eqn)
        and params["feature_group_count"] == 1
        and params["batch_group_count"] == 1
        and all(d == 1 for d in params["lhs_dilation"])
        and all(lo >= 0 and hi >= 0 for lo, hi in params["padding"])
    )


def _use_onednn(x, w, strides, padding, dilation, params) -> bool:
    """Whether this channels-last convolution goes to oneDNN (float32 in and out)."""
    preferred = params["preferred_element_type"]
    return (
        x.dtype == jnp.float32
        and w.dtype == jnp.float32
        and (preferred is None or jnp.dtype(preferred) == jnp.float32)
        and _dnnl.supports(x.shape, w.shape, strides, padding, dilation, x.dtype)
    )


def _conv_from_params(lhs: jax.Array, rhs: jax.Array, params: dict, onednn: bool) -> jax.Array:
    """``conv_general_dilated`` with these primitive parameters, through oneDNN (when
    ``onednn`` and it can) or :func:`patch_conv`."""
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    # Specs list dimension positions: (batch, feature, *spatial) and (out, in, *spatial).
    x = jnp.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
    w = jnp.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
    strides, dilation = tuple(params["window_strides"]), tuple(params["rhs_dilation"])
    padding = tuple(map(tuple, params["padding"]))
    if onednn and _use_onednn(x, w, strides, padding, dilation, params):
        y = _dnnl.conv(x, w, strides, padding, dilation)
    else:
        y = patch_conv(
            x, w, strides, padding, dilation, params["precision"], params["preferred_element_type"]
        )
    order = [0] * y.ndim  # y is (batch, *spatial, feature); put each where out_spec says
    order[out_spec[0]], order[out_spec[1]] = 0, y.ndim - 1
    for i, position in enumerate(out_spec[2:]):
        order[position] = 1 + i
    return jnp.transpose(y, order)


def _replacement(eqn: Any, onednn: bool = True) -> Callable | None:
    """``inputs -> outputs`` computing ``eqn`` the CPU-friendly way, or ``None``."""
    name = eqn.primitive.name
    if name == "conv_general_dilated" and _conv_eligible(eqn):
        return lambda inputs: [_conv_from_params(*inputs, eqn.params, onednn)]
    if name == "reduce_window_max" and _pool_eligible(eqn):
        window = tuple(eqn.params["window_dimensions"])
        return lambda inputs: [reshape_max_pool(inputs[0], window)]
    return None


def _inlined(eqn: Any) -> Any:
    """The closed jaxpr of a nested ``jit`` call, which is evaluated inline; else ``None``."""
    inner = eqn.params.get("jaxpr")
    if eqn.primitive.name in _INLINED_CALLS and isinstance(inner, ClosedJaxpr):
        return inner
    return None


def _evaluate(jaxpr: Any, consts: list, args: list, onednn: bool) -> list:
    """Evaluate ``jaxpr`` with eligible convolutions and pooling replaced, inlining nested
    ``jit``s."""
    env: dict = {}

    def read(var):
        return var.val if isinstance(var, Literal) else env[var]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        inputs = [read(v) for v in eqn.invars]
        replace, inner = _replacement(eqn, onednn), _inlined(eqn)
        if replace is not None:
            outputs = replace(inputs)
        elif inner is not None:
            outputs = _evaluate(inner.jaxpr, inner.consts, inputs, onednn)
        else:
            outputs = bind_equation(eqn, inputs)
        env.update(zip(eqn.outvars, outputs, strict=True))
    return [read(v) for v in jaxpr.outvars]


def _kinds(jaxpr: Any, onednn: bool) -> set[str]:
    """What :func:`_evaluate` would replace in ``jaxpr``: ``"onednn"`` for a convolution
    oneDNN runs, ``"patches"`` for one as patch products, ``"pooling"``."""
    found = set()
    for eqn in jaxpr.eqns:
        inner = _inlined(eqn)
        if inner is not None:
            found |= _kinds(inner.jaxpr, onednn)
        elif _replacement(eqn) is None:
            continue
        elif eqn.primitive.name == "reduce_window_max":
            found.add("pooling")
        else:
            found.add("onednn" if onednn and _onednn_eligible(eqn) else "patches")
    return found


def _onednn_eligible(eqn: Any) -> bool:
    """Whether :func:`_conv_from_params` sends this eligible convolution to oneDNN."""
    params = eqn.params
    lhs_spec, rhs_spec, _ = params["dimension_numbers"]
    x, w = eqn.invars[0].aval, eqn.invars[1].aval
    x_shape = [x.shape[i] for i in (lhs_spec[0], *lhs_spec[2:], lhs_spec[1])]
    w_shape = [w.shape[i] for i in (*rhs_spec[2:], rhs_spec[1], rhs_spec[0])]
    x_like = jax.ShapeDtypeStruct(x_shape, x.dtype)
    w_like = jax.ShapeDtypeStruct(w_shape, w.dtype)
    strides, dilation = tuple(params["window_strides"]), tuple(params["rhs_dilation"])
    padding = tuple(map(tuple, params["padding"]))
    return _use_onednn(x_like, w_like, strides, padding, dilation, params)


def _split_static(args: tuple, kwargs: dict):
    """The array leaves of ``(args, kwargs)`` (traced) and a function rebuilding the
    arguments from them with every other leaf (a Python number, a string) as it was."""
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    traced = [_is_traceable(leaf) for leaf in leaves]

    def rebuild(arrays):
        arrays = iter(arrays)
        full = [next(arrays) if t else leaf for leaf, t in zip(leaves, traced, strict=True)]
        return jax.tree_util.tree_unflatten(treedef, full)

    return [leaf for leaf, t in zip(leaves, traced, strict=True) if t], rebuild


def _is_traceable(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic, Tracer))


def _jaxpr(fn: Callable, args: tuple, kwargs: dict):
    """``fn``'s closed jaxpr over the array leaves of its arguments, those leaves, and the
    shapes of its outputs."""
    arrays, rebuild = _split_static(args, kwargs)

    def flat(*arrays):
        args, kwargs = rebuild(arrays)
        return fn(*args, **kwargs)

    closed, shapes = jax.make_jaxpr(flat, return_shape=True)(*arrays)
    return closed, arrays, shapes


def rewrites(fn: Callable, *args: Any, onednn: bool = True, **kwargs: Any) -> str:
    """What :func:`cpu_friendly` changes in ``fn`` called on these arguments:
    ``"onednn"`` (at least one convolution runs on oneDNN), ``"patches"`` (convolutions as
    patch matrix products, or max pooling, rewritten; none on oneDNN) or ``"none"``."""
    found = _kinds(_jaxpr(fn, args, kwargs)[0].jaxpr, onednn)
    if "onednn" in found:
        return "onednn"
    return "patches" if found else "none"


def affects(fn: Callable, *args: Any, **kwargs: Any) -> bool:
    """Whether :func:`cpu_friendly` changes anything in ``fn`` called on ``args``."""
    return rewrites(fn, *args, **kwargs) != "none"


def cpu_friendly(fn: Callable, *, onednn: bool = True) -> Callable:
    """``fn`` with its convolutions computed by oneDNN (or as chunked patch matrix
    products) and its non-overlapping max pooling as strided-slice selections (see the
    module notes).

    ``onednn=False`` uses the patch products even where oneDNN is available (for example
    on a mesh of CPU devices: XLA cannot split a oneDNN call across devices and gathers
    its operands). The returned function takes the same positional and keyword arguments:
    their array leaves (JAX and NumPy arrays) are traced and every other leaf (a Python
    bool or number, a string) reaches ``fn`` unchanged, as in a plain call. It returns the
    same values to float32 rounding, and can be differentiated, vmapped and jitted like
    ``fn``. The same wrapper is returned for the same hashable ``fn`` (an LRU cache of 64,
    which keeps those functions alive), so jitted code that takes it as a static argument
    is compiled once; an unhashable ``fn`` gets a fresh wrapper on each call.
    """
    try:
        return _rewritten(fn, bool(onednn))
    except TypeError:  # an unhashable callable: a fresh wrapper
        return _rewritten.__wrapped__(fn, bool(onednn))


@functools.lru_cache(maxsize=64)
def _rewritten(fn: Callable, onednn: bool) -> Callable:
    @functools.wraps(fn)
    def rewritten(*args, **kwargs):
        closed, arrays, shapes = _jaxpr(fn, args, kwargs)
        outputs = _evaluate(closed.jaxpr, closed.consts, arrays, onednn)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), outputs)

    return rewritten


def convolutions(onednn: bool = True) -> str:
    """Which convolutions :func:`cpu_friendly` uses here: ``"onednn"`` (its float32
    convolutions go to oneDNN, see :mod:`jax_spectral.onednn`) or ``"patches"``."""
    return "onednn" if onednn and _dnnl.available() else "patches"
