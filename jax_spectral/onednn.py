"""Convolutions through oneDNN on the CPU, as three JAX primitives that differentiate into
each other.

XLA's CPU backend runs the input and kernel gradients of a convolution several times
slower than the forward pass. oneDNN (the library TensorFlow uses on CPUs) has fast kernels
for all three: the forward convolution, its input gradient (``backward_data``) and its
kernel gradient (``backward_weights``; for stride-1 convolutions with 16 or more
channels, matrix products over the padded input's rows instead). The optional
``jax-spectral-onednn`` package (``native/`` in the repository, built from source by pip)
compiles them as XLA FFI handlers in C++: XLA calls them with its own buffers and no
Python runs on the call path. Three JAX primitives wrap them:

* ``onednn_conv(x, w)``: the convolution, ``x`` ``(N, *spatial, C)`` and ``w``
  ``(*window, C, O)`` to ``y`` ``(N, *out_spatial, O)`` (cross-correlation, as
  ``lax.conv_general_dilated``);
* ``onednn_conv_input_grad(dy, w)``: ``x``-shaped, the transpose of ``x -> conv(x, w)``;
* ``onednn_conv_kernel_grad(x, dy)``: ``w``-shaped, the transpose of ``w -> conv(x, w)``.

Each is bilinear, so its JVP is the sum of two calls of itself, and its transposes with
respect to either argument are the other two primitives (the same algebra as XLA's own
convolution rules). Any order of forward and reverse differentiation therefore stays in
these three kernels: a forward-over-reverse HVP is exact jvp-of-grad, computed with
oneDNN's kernels only. ``vmap`` folds a batched input into the image axis where it can
and otherwise loops (``lax.map``) over the mapped axis.

The geometry (strides, padding, dilation) travels as FFI attributes, so the three targets
have fixed names and a program from JAX's persistent compilation cache runs in another
process unchanged. The kernels cache oneDNN's primitives per geometry (at most 256), split
a call's images into chunks that run on XLA's own intra-op thread pool (oneDNN's OpenMP
limited to one thread on each; ``JAX_SPECTRAL_ONEDNN_THREADS=openmp`` runs each call whole
on oneDNN's own OpenMP threads instead), and report failures as errors that JAX raises,
never as NaN. A child forked before the parent computed can use them (JAX itself hangs in
a child forked after it has computed).

Install with ``pip install --no-build-isolation ./native`` beside ``jax-spectral[onednn]``
(Linux x86-64, a C++ compiler and CMake; oneDNN's headers and library come from the
``onednn-devel-cpu-gomp`` and ``onednn-cpu-gomp`` wheels). ``libdnnl.so.3`` is found in
the running environment's ``lib`` folder (or ``~/.local/lib``), on the loader's path, or
at the path in ``JAX_SPECTRAL_ONEDNN``; ``JAX_SPECTRAL_ONEDNN=0`` turns oneDNN off.
Without it :func:`available` is false and :mod:`jax_spectral.rewrite` falls back to patch
matrix products. Only float32 is handled, and only where oneDNN has a JIT kernel for the
CPU and the geometry (its reference loops, ~100x slower, are refused).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import site
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._jaxapi import Primitive, ShapedArray, ad, batching, mlir

__all__ = ["available", "conv", "implementations", "supports", "version"]

_TARGETS = {  # kernel -> (registered target name, exported handler symbol)
    "forward": ("jax_spectral_onednn_forward", "JaxSpectralOnednnForward"),
    "input_grad": ("jax_spectral_onednn_input_grad", "JaxSpectralOnednnInputGrad"),
    "kernel_grad": ("jax_spectral_onednn_kernel_grad", "JaxSpectralOnednnKernelGrad"),
}


def _dnnl_candidates() -> list[str]:
    setting = os.environ.get("JAX_SPECTRAL_ONEDNN", "")
    if setting:
        return [setting]
    # pip puts the wheel's library in <prefix>/lib: the environment's, or ~/.local's
    # for a --user install.
    prefixes = (sys.prefix, site.getuserbase(), sys.base_prefix)
    found = [str(Path(prefix) / "lib" / "libdnnl.so.3") for prefix in prefixes]
    system = ctypes.util.find_library("dnnl")
    return [*found, *([system] if system else [])]


def _kernels_path() -> Path | None:
    try:
        import jax_spectral_onednn
    except ImportError:
        return None
    path = Path(jax_spectral_onednn.LIBRARY)
    return path if path.exists() else None


class _Kernels:
    """The compiled kernels' shared library, its handlers registered with XLA."""

    def __init__(self, path: Path):
        # libdnnl.so.3 first, where the library's run path would not find it (an install
        # outside the environment's prefix, or JAX_SPECTRAL_ONEDNN): the loader then
        # resolves the kernels' dependency on it by its soname, with no global symbols.
        for candidate in _dnnl_candidates():
            if os.sep not in candidate or os.path.exists(candidate):
                try:
                    ctypes.CDLL(candidate)
                    break
                except OSError:
                    continue
        self.lib = ctypes.CDLL(str(path))
        size = ctypes.c_size_t
        self.lib.JaxSpectralOnednnCheck.restype = ctypes.c_int
        self.lib.JaxSpectralOnednnCheck.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 8 + [size]
        self.lib.JaxSpectralOnednnVersion.argtypes = [ctypes.c_char_p, size]
        self.lib.JaxSpectralOnednnCached.restype = size
        self.lib.JaxSpectralOnednnCacheBound.restype = size
        text = ctypes.create_string_buffer(32)
        self.lib.JaxSpectralOnednnVersion(text, 32)
        self.version = text.value.decode()
        for name, symbol in _TARGETS.values():
            handler = jax.ffi.pycapsule(getattr(self.lib, symbol))
            jax.ffi.register_ffi_target(name, handler, platform="cpu")

    def check(self, x_shape, w_shape, y_shape, strides, padding, dilation) -> tuple[int, str]:
        """(1, names) where oneDNN has JIT kernels for all three; (0, names) where one is
        a reference loop; (-1, reason) for an invalid geometry."""
        arrays = [
            np.ascontiguousarray(a, np.int64)
            for a in (
                x_shape,
                w_shape,
                y_shape,
                strides,
                [lo for lo, _ in padding],
                [hi for _, hi in padding],
                dilation,
            )
        ]
        text = ctypes.create_string_buffer(512)
        status = self.lib.JaxSpectralOnednnCheck(
            len(x_shape) - 2, *(a.ctypes.data for a in arrays), text, 512
        )
        return status, text.value.decode()

    def cached(self) -> tuple[int, int]:
        """(primitives cached now, the cache's bound)."""
        return self.lib.JaxSpectralOnednnCached(), self.lib.JaxSpectralOnednnCacheBound()


@functools.cache
def _kernels() -> _Kernels | None:
    if os.environ.get("JAX_SPECTRAL_ONEDNN", "") == "0":
        return None
    path = _kernels_path()
    if path is None:
        return None
    try:
        return _Kernels(path)
    except (OSError, AttributeError):  # libdnnl.so.3 missing, or a foreign library
        return None


def available() -> bool:
    """Whether the compiled oneDNN kernels were found and registered (see the module
    notes)."""
    return _kernels() is not None


def version() -> str | None:
    """The loaded oneDNN's version, or ``None``."""
    kernels = _kernels()
    return None if kernels is None else kernels.version


def _out_spatial(spatial, window, strides, padding, dilation):
    return tuple(
        (s + lo + hi - (k - 1) * d - 1) // t + 1
        for s, k, t, (lo, hi), d in zip(spatial, window, strides, padding, dilation, strict=True)
    )


@functools.lru_cache(maxsize=1024)
def _check(x_shape, w_shape, strides, padding, dilation) -> tuple[int, str]:
    kernels = _kernels()
    if kernels is None:
        return -1, "oneDNN is not available"
    y_shape = _y_shape(x_shape, w_shape, strides, padding, dilation)
    return kernels.check(x_shape, w_shape, y_shape, strides, padding, dilation)


def implementations(x_shape, w_shape, strides, padding, dilation) -> str:
    """The oneDNN implementations chosen for the three kernels of this geometry (for
    benchmarks and reports), or why there are none."""
    return _check(*_key(x_shape, w_shape, strides, padding, dilation))[1]


def supports(x_shape, w_shape, strides, padding, dilation, dtype) -> bool:
    """Whether :func:`conv` can run this convolution: JAX's default backend is the CPU,
    oneDNN loaded, float32, 1-3 spatial dimensions, non-negative padding, an implemented
    geometry."""
    rank = len(x_shape) - 2
    return (
        jax.default_backend() == "cpu"
        and jnp.dtype(dtype) == jnp.float32
        and 1 <= rank <= 3
        and len(w_shape) == rank + 2
        and w_shape[-2] == x_shape[-1]
        and all(lo >= 0 and hi >= 0 for lo, hi in padding)
        and all(s > 0 for s in (*x_shape, *w_shape))
        and all(
            s > 0 for s in _out_spatial(x_shape[1:-1], w_shape[:rank], strides, padding, dilation)
        )
        and _check(*_key(x_shape, w_shape, strides, padding, dilation))[0] == 1
    )


def _key(x_shape, w_shape, strides, padding, dilation):
    return (
        tuple(x_shape),
        tuple(w_shape),
        tuple(strides),
        tuple(tuple(p) for p in padding),
        tuple(dilation),
    )


# -- primitives ---------------------------------------------------------------------------

conv_p = Primitive("onednn_conv")
input_grad_p = Primitive("onednn_conv_input_grad")
kernel_grad_p = Primitive("onednn_conv_kernel_grad")


def conv(x, w, strides, padding, dilation):
    """``x`` ``(N, *spatial, C)`` convolved with ``w`` ``(*window, C, O)`` by oneDNN;
    ``padding`` is explicit ``(low, high)`` per spatial dimension, ``dilation`` the
    kernel's. Raises ``ValueError`` where :func:`supports` is false."""
    dtype = jnp.result_type(x, w)
    if x.dtype != w.dtype or not supports(x.shape, w.shape, strides, padding, dilation, dtype):
        raise ValueError(
            f"oneDNN cannot run this convolution: x {x.dtype}{list(x.shape)}, w "
            f"{w.dtype}{list(w.shape)}, strides {strides}, padding {padding}, dilation "
            f"{dilation} (see onednn.supports; oneDNN available: {available()})."
        )
    return conv_p.bind(x, w, **_params(x.shape, w.shape, strides, padding, dilation))


def _params(x_shape, w_shape, strides, padding, dilation):
    x_shape, w_shape, strides, padding, dilation = _key(
        x_shape, w_shape, strides, padding, dilation
    )
    return dict(
        x_shape=x_shape, w_shape=w_shape, strides=strides, padding=padding, dilation=dilation
    )


def _y_shape(x_shape, w_shape, strides, padding, dilation):
    rank = len(x_shape) - 2
    out = _out_spatial(x_shape[1:-1], w_shape[:rank], strides, padding, dilation)
    return (x_shape[0], *out, w_shape[-1])


_KERNELS = {conv_p: "forward", input_grad_p: "input_grad", kernel_grad_p: "kernel_grad"}


def _abstract(primitive):
    def abstract_eval(a, b, **params):
        y_shape = _y_shape(**params)
        expected = {  # the operands' shapes, then the result's
            conv_p: (params["x_shape"], params["w_shape"], y_shape),
            input_grad_p: (y_shape, params["w_shape"], params["x_shape"]),
            kernel_grad_p: (params["x_shape"], y_shape, params["w_shape"]),
        }[primitive]
        if (a.shape, b.shape) != expected[:2] or {a.dtype, b.dtype} != {jnp.dtype(jnp.float32)}:
            raise TypeError(
                f"{primitive.name} takes float32 operands of shapes {expected[:2]}, got "
                f"{a.dtype}{list(a.shape)} and {b.dtype}{list(b.shape)}."
            )
        return ShapedArray(expected[2], jnp.float32)

    return abstract_eval


@functools.lru_cache(maxsize=256)
def _eager_call(primitive, params: tuple) -> Callable:
    return jax.jit(functools.partial(primitive.bind, **dict(params)))


def _eager(primitive):
    def impl(a, b, **params):  # outside jit: one compiled call per geometry, reused
        return _eager_call(primitive, tuple(sorted(params.items())))(a, b)

    return impl


def _lowering(primitive):
    def lower(ctx, a, b, *, x_shape, w_shape, strides, padding, dilation):
        del x_shape, w_shape  # the kernels read the shapes from their buffers
        target = _TARGETS[_KERNELS[primitive]][0]
        return jax.ffi.ffi_lowering(target)(
            ctx,
            a,
            b,
            strides=np.array(strides, np.int64),
            low=np.array([lo for lo, _ in padding], np.int64),
            high=np.array([hi for _, hi in padding], np.int64),
            dilation=np.array(dilation, np.int64),
        )

    return lower


for _primitive in _KERNELS:
    _primitive.def_impl(_eager(_primitive))
    _primitive.def_abstract_eval(_abstract(_primitive))
    mlir.register_lowering(_primitive, _lowering(_primitive), platform="cpu")


# Transposes: conv(x, w) = y; input_grad(dy, w) = x-shaped; kernel_grad(x, dy) = w-shaped.
ad.defbilinear(
    conv_p,
    lambda ct, x, w, **p: input_grad_p.bind(ct, w, **p),
    lambda ct, x, w, **p: kernel_grad_p.bind(x, ct, **p),
)
ad.defbilinear(
    input_grad_p,
    lambda ct, dy, w, **p: conv_p.bind(ct, w, **p),
    lambda ct, dy, w, **p: kernel_grad_p.bind(ct, dy, **p),
)
ad.defbilinear(
    kernel_grad_p,
    lambda ct, x, dy, **p: input_grad_p.bind(dy, ct, **p),
    lambda ct, x, dy, **p: conv_p.bind(x, ct, **p),
)


# Batching: fold a mapped image-like operand into the images when the other is unmapped,
# else loop over the mapped axis.
_FOLDABLE = frozenset({conv_p, input_grad_p})  # their first operand carries the images


def _batcher(primitive):
    def rule(args, dims, **params):
        size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
        args = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims, strict=True)]
        mapped = [d is not None for d in dims]
        if size == 0:  # nothing to compute: the empty result, as XLA's rule gives
            pairs = zip(args, mapped, strict=True)
            one = [jax.ShapeDtypeStruct(a.shape[m:], a.dtype) for a, m in pairs]
            out = jax.eval_shape(lambda *a: primitive.bind(*a, **params), *one)
            return jnp.zeros((0, *out.shape), out.dtype), 0
        if primitive in _FOLDABLE and mapped == [True, False]:
            a = args[0]
            folded = a.reshape(size * a.shape[1], *a.shape[2:])
            x_shape = (size * params["x_shape"][0], *params["x_shape"][1:])
            new = {**params, "x_shape": x_shape}
            out = primitive.bind(folded, args[1], **new)
            return out.reshape(size, -1, *out.shape[1:]), 0

        def one(sliced):
            it = iter(sliced)
            operands = [next(it) if m else a for a, m in zip(args, mapped, strict=True)]
            return primitive.bind(*operands, **params)

        return lax.map(one, tuple(a for a, m in zip(args, mapped, strict=True) if m)), 0

    return rule


for _primitive in (conv_p, input_grad_p, kernel_grad_p):
    batching.primitive_batchers[_primitive] = _batcher(_primitive)
