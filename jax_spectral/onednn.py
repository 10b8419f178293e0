"""Convolutions through oneDNN on the CPU, as three JAX primitives that differentiate into
each other.

XLA's CPU backend runs the input and kernel gradients of a convolution several times
slower than the forward pass. oneDNN (the library TensorFlow uses on CPUs) has fast kernels
for all three: the forward convolution, its input gradient (``backward_data``) and its
kernel gradient (``backward_weights``). This module calls them through oneDNN's C API with
:mod:`ctypes`, from XLA custom calls (``jax.ffi``) whose handlers are ctypes functions: XLA
hands over its own buffers' addresses, so nothing is copied. Three JAX primitives wrap them:

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

oneDNN comes from the optional ``onednn-cpu-gomp`` wheel (Linux x86-64; ``pip install
"jax-spectral[onednn]"``), found as ``libdnnl.so.3`` in the running environment's
``lib`` folder (or ``~/.local/lib`` after ``pip install --user``) or on the loader's path,
or at the path in ``JAX_SPECTRAL_ONEDNN``; ``JAX_SPECTRAL_ONEDNN=0`` turns it off. Without
it :func:`available` is false and :mod:`jax_spectral.rewrite` falls back to patch matrix
products. Only float32 is handled, and only where oneDNN has a JIT kernel for the CPU and
the geometry (its reference loops, ~100x slower, are refused). Calls run one at a time
(one oneDNN stream, each kernel on all cores through OpenMP). A kernel that fails at run
time writes NaN into its result and logs the error: nothing raises inside XLA (a Ctrl-C
that lands in a handler is passed on to the main thread). The handlers are Python
functions, which cannot run once the interpreter shuts down, so at exit the process waits
for oneDNN work still running or queued (about a second longer when any was compiled).
"""

from __future__ import annotations

import _thread
import atexit
import ctypes
import ctypes.util
import functools
import hashlib
import logging
import math
import os
import site
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir

__all__ = ["available", "conv", "supports"]

_F32 = 3  # dnnl_f32
_FORMAT_ANY = 1  # dnnl_format_tag_any
_CPU = 1  # dnnl_cpu
_IN_ORDER = 1  # dnnl_stream_in_order
_FORWARD_TRAINING = 64
_DIRECT = 1  # dnnl_convolution_direct
_QUERY_IMPLEMENTATION, _QUERY_WEIGHTS, _QUERY_DIFF_WEIGHTS = 8, 131, 132
_SRC, _DST, _WEIGHTS = 1, 17, 33  # DNNL_ARG_*; a reorder's FROM/TO are SRC/DST
_DIFF_SRC, _DIFF_DST, _DIFF_WEIGHTS = 129, 145, 161
_MAX_DIMS = 12

_Dims = ctypes.c_int64 * _MAX_DIMS
_P = ctypes.c_void_p
_PP = ctypes.POINTER(ctypes.c_void_p)


class _Arg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", _P)]


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int)]


_SIGNATURES = {
    "dnnl_version": ([], ctypes.POINTER(_Version)),
    "dnnl_engine_create": ([_PP, ctypes.c_int, ctypes.c_size_t], ctypes.c_int),
    "dnnl_stream_create": ([_PP, _P, ctypes.c_uint], ctypes.c_int),
    "dnnl_stream_wait": ([_P], ctypes.c_int),
    "dnnl_memory_desc_create_with_strides": (
        [_PP, ctypes.c_int, _Dims, ctypes.c_int, _Dims],
        ctypes.c_int,
    ),
    "dnnl_memory_desc_create_with_tag": (
        [_PP, ctypes.c_int, _Dims, ctypes.c_int, ctypes.c_int],
        ctypes.c_int,
    ),
    "dnnl_memory_desc_get_size": ([_P], ctypes.c_size_t),
    "dnnl_convolution_forward_primitive_desc_create": (
        [_PP, _P, ctypes.c_int, ctypes.c_int, _P, _P, _P, _P, _Dims, _Dims, _Dims, _Dims, _P],
        ctypes.c_int,
    ),
    "dnnl_convolution_backward_data_primitive_desc_create": (
        [_PP, _P, ctypes.c_int, _P, _P, _P, _Dims, _Dims, _Dims, _Dims, _P, _P],
        ctypes.c_int,
    ),
    "dnnl_convolution_backward_weights_primitive_desc_create": (
        [_PP, _P, ctypes.c_int, _P, _P, _P, _P, _Dims, _Dims, _Dims, _Dims, _P, _P],
        ctypes.c_int,
    ),
    "dnnl_reorder_primitive_desc_create": ([_PP, _P, _P, _P, _P, _P], ctypes.c_int),
    "dnnl_primitive_desc_query_md": ([_P, ctypes.c_int, ctypes.c_int], _P),
    "dnnl_primitive_desc_query": ([_P, ctypes.c_int, ctypes.c_int, _P], ctypes.c_int),
    "dnnl_primitive_create": ([_PP, _P], ctypes.c_int),
    "dnnl_memory_create": ([_PP, _P, _P, _P], ctypes.c_int),
    "dnnl_memory_destroy": ([_P], ctypes.c_int),
    "dnnl_primitive_execute": ([_P, _P, ctypes.c_int, ctypes.POINTER(_Arg)], ctypes.c_int),
}


class _Library:
    """libdnnl with its signatures, one CPU engine and one stream (used under a lock)."""

    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        for name, (argtypes, restype) in _SIGNATURES.items():
            function = getattr(self.lib, name)
            function.argtypes, function.restype = argtypes, restype
        version = self.lib.dnnl_version().contents
        if version.major != 3:
            raise OSError(f"oneDNN 3.x needed, found {version.major}.{version.minor}")
        self.version = f"{version.major}.{version.minor}.{version.patch}"
        self.engine, self.stream = _P(), _P()
        self.check(self.lib.dnnl_engine_create(ctypes.byref(self.engine), _CPU, 0))
        self.check(self.lib.dnnl_stream_create(ctypes.byref(self.stream), self.engine, _IN_ORDER))
        self.lock = threading.Lock()

    @staticmethod
    def check(status: int) -> None:
        if status != 0:
            raise RuntimeError(f"oneDNN call failed with status {status}")

    def create(self, function: str, *args) -> _P:
        handle = _P()
        self.check(getattr(self.lib, function)(ctypes.byref(handle), *args))
        return handle

    def strided(self, dims, strides) -> _P:
        return self.create(
            "dnnl_memory_desc_create_with_strides",
            len(dims),
            _Dims(*dims),
            _F32,
            _Dims(*strides),
        )

    def any_format(self, dims) -> _P:
        return self.create(
            "dnnl_memory_desc_create_with_tag", len(dims), _Dims(*dims), _F32, _FORMAT_ANY
        )

    def queried(self, descriptor: _P, what: int) -> _P:
        return _P(self.lib.dnnl_primitive_desc_query_md(descriptor, what, 0))

    def implementation(self, descriptor: _P) -> str:
        name = ctypes.c_char_p()
        self.check(
            self.lib.dnnl_primitive_desc_query(
                descriptor, _QUERY_IMPLEMENTATION, 0, ctypes.byref(name)
            )
        )
        return (name.value or b"").decode()

    def reorder(self, source: _P, target: _P) -> _P:
        descriptor = self.create(
            "dnnl_reorder_primitive_desc_create", source, self.engine, target, self.engine, None
        )
        return self.create("dnnl_primitive_create", descriptor)

    def execute(self, primitive: _P, args: list[tuple[int, _P, int]]) -> None:
        """Run ``primitive`` on ``(argument kind, memory descriptor, address)`` triples."""
        memories = [
            self.create("dnnl_memory_create", md, self.engine, _P(address))
            for _, md, address in args
        ]
        try:
            pairs = zip(args, memories, strict=True)
            packed = (_Arg * len(args))(*(_Arg(k, m) for (k, _, _), m in pairs))
            self.check(self.lib.dnnl_primitive_execute(primitive, self.stream, len(args), packed))
            self.check(self.lib.dnnl_stream_wait(self.stream))
        finally:
            for memory in memories:
                self.lib.dnnl_memory_destroy(memory)


def _candidates() -> list[str]:
    setting = os.environ.get("JAX_SPECTRAL_ONEDNN", "")
    if setting:
        return [setting]
    # pip puts the wheel's library in <prefix>/lib: the environment's, or ~/.local's
    # for a --user install.
    prefixes = (sys.prefix, site.getuserbase(), sys.base_prefix)
    found = [str(Path(prefix) / "lib" / "libdnnl.so.3") for prefix in prefixes]
    system = ctypes.util.find_library("dnnl")
    return [*found, *([system] if system else [])]


@functools.cache
def _library() -> _Library | None:
    if os.environ.get("JAX_SPECTRAL_ONEDNN", "") == "0" or _ffi_api_version() is None:
        return None
    for path in _candidates():
        if os.sep in path and not os.path.exists(path):
            continue
        try:
            library = _Library(path)
        except (OSError, AttributeError, RuntimeError):
            continue
        atexit.register(_finish_pending_work)
        return library
    return None


class _Activity:
    """Handler calls in flight and the time the last one ended."""

    lock = threading.Lock()
    in_flight = 0
    last = 0.0


QUIET_SECONDS = 1.0  # at exit: no oneDNN call for this long means no queued work is left


def _finish_pending_work(limit: float = 600.0) -> None:
    """Wait at exit for computations still running or queued. Their oneDNN handlers are
    Python callbacks: once the interpreter shuts down they cannot run, and XLA's teardown
    would wait for them forever (or crash). Results still referenced are waited for
    directly; work whose results were dropped (a loop stopped by Ctrl-C) is waited out
    until no handler has run for ``QUIET_SECONDS`` (so a process that compiled oneDNN calls
    takes that much longer to exit)."""
    for array in jax.live_arrays():
        try:
            array.block_until_ready()
        except Exception:  # noqa: BLE001 - a failed computation has nothing left to wait for
            pass
    if not _handlers:  # no program with oneDNN calls was compiled in this process
        return
    start = time.monotonic()
    while time.monotonic() < start + limit and (
        _Activity.in_flight or time.monotonic() - max(_Activity.last, start) < QUIET_SECONDS
    ):
        time.sleep(0.05)


def available() -> bool:
    """Whether oneDNN was found and loaded (see the module notes)."""
    return _library() is not None


def version() -> str | None:
    """The loaded oneDNN's version, or ``None``."""
    library = _library()
    return None if library is None else library.version


class _Geometry:
    """The three primitives of one convolution geometry, with weight reorders between the
    user's ``(*window, C, O)`` layout and the formats the kernels chose."""

    def __init__(self, library: _Library, x_shape, w_shape, strides, padding, dilation):
        self.library = lib = library
        rank = len(x_shape) - 2
        n, spatial, c = x_shape[0], x_shape[1:-1], x_shape[-1]
        window, o = w_shape[:rank], w_shape[-1]
        out = _out_spatial(spatial, window, strides, padding, dilation)
        self.x_shape, self.w_shape = tuple(x_shape), tuple(w_shape)
        key = repr(_key(x_shape, w_shape, strides, padding, dilation)).encode()
        self.name = hashlib.sha256(key).hexdigest()[:20]  # the same in every process
        self.y_shape = (n, *out, o)
        # oneDNN's dims are logical (N, C, *spatial) and (O, C, *window); strides give our
        # channels-last layouts.
        self.x_md = lib.strided((n, c, *spatial), _channels_last_strides(n, c, spatial))
        self.y_md = lib.strided((n, o, *out), _channels_last_strides(n, o, out))
        w_dims = (o, c, *window)
        inner = [math.prod(window[d + 1 :]) * c * o for d in range(rank)]
        self.w_md = lib.strided(w_dims, (1, o, *inner))
        geometry = (
            _Dims(*strides),
            _Dims(*(d - 1 for d in dilation)),
            _Dims(*(lo for lo, _ in padding)),
            _Dims(*(hi for _, hi in padding)),
        )
        w_any = lib.any_format(w_dims)
        forward = lib.create(
            "dnnl_convolution_forward_primitive_desc_create",
            lib.engine,
            _FORWARD_TRAINING,
            _DIRECT,
            self.x_md,
            w_any,
            None,
            self.y_md,
            *geometry,
            None,
        )
        backward_data = lib.create(
            "dnnl_convolution_backward_data_primitive_desc_create",
            lib.engine,
            _DIRECT,
            self.x_md,
            w_any,
            self.y_md,
            *geometry,
            forward,
            None,
        )
        backward_weights = lib.create(
            "dnnl_convolution_backward_weights_primitive_desc_create",
            lib.engine,
            _DIRECT,
            self.x_md,
            w_any,
            None,
            self.y_md,
            *geometry,
            forward,
            None,
        )
        self.kernels, self.implementations = {}, {}
        for name, descriptor, query in (
            ("forward", forward, _QUERY_WEIGHTS),
            ("input_grad", backward_data, _QUERY_WEIGHTS),
            ("kernel_grad", backward_weights, _QUERY_DIFF_WEIGHTS),
        ):
            implementation = lib.implementation(descriptor)
            if implementation.startswith("ref"):
                # oneDNN's reference loops are ~100x slower than its JIT kernels (and than
                # the patch products): this CPU or geometry has no fast kernel.
                raise RuntimeError(f"only oneDNN's reference kernel for {name}")
            self.implementations[name] = implementation
            chosen = lib.queried(descriptor, query)
            packed = np.empty(lib.lib.dnnl_memory_desc_get_size(chosen) // 4 + 1, np.float32)
            reorder = (
                lib.reorder(chosen, self.w_md)
                if name == "kernel_grad"
                else lib.reorder(self.w_md, chosen)
            )
            primitive = lib.create("dnnl_primitive_create", descriptor)
            self.kernels[name] = (primitive, chosen, packed, reorder)

    def run(self, name: str, a: int, b: int, out: int) -> None:
        """One kernel on buffers at these addresses: ``forward(x, w) -> y``,
        ``input_grad(dy, w) -> dx``, ``kernel_grad(x, dy) -> dw``."""
        primitive, chosen, packed, reorder = self.kernels[name]
        lib, scratch = self.library, packed.ctypes.data
        with lib.lock:  # one stream, and the packed weights are reused
            if name == "kernel_grad":
                lib.execute(
                    primitive,
                    [
                        (_SRC, self.x_md, a),
                        (_DIFF_DST, self.y_md, b),
                        (_DIFF_WEIGHTS, chosen, scratch),
                    ],
                )
                lib.execute(reorder, [(_SRC, chosen, scratch), (_DST, self.w_md, out)])
                return
            lib.execute(reorder, [(_SRC, self.w_md, b), (_DST, chosen, scratch)])
            if name == "forward":
                args = [(_SRC, self.x_md, a), (_DST, self.y_md, out)]
            else:
                args = [(_DIFF_DST, self.y_md, a), (_DIFF_SRC, self.x_md, out)]
            lib.execute(primitive, [*args, (_WEIGHTS, chosen, scratch)])

    def output_shape(self, name: str) -> tuple[int, ...]:
        return {"forward": self.y_shape, "input_grad": self.x_shape, "kernel_grad": self.w_shape}[
            name
        ]

    def apply(self, name: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """:meth:`run` on NumPy arrays (for tests and benchmarks)."""
        a = np.ascontiguousarray(a, np.float32)
        b = np.ascontiguousarray(b, np.float32)
        out = np.empty(self.output_shape(name), np.float32)
        self.run(name, a.ctypes.data, b.ctypes.data, out.ctypes.data)
        return out


def _channels_last_strides(n, c, spatial):
    inner = [math.prod(spatial[d + 1 :]) * c for d in range(len(spatial))]
    return (math.prod(spatial) * c, 1, *inner)


def _out_spatial(spatial, window, strides, padding, dilation):
    return tuple(
        (s + lo + hi - (k - 1) * d - 1) // t + 1
        for s, k, t, (lo, hi), d in zip(spatial, window, strides, padding, dilation, strict=True)
    )


@functools.lru_cache(maxsize=256)
def _geometry(x_shape, w_shape, strides, padding, dilation) -> _Geometry | None:
    library = _library()
    if library is None:
        return None
    try:
        return _Geometry(library, x_shape, w_shape, strides, padding, dilation)
    except RuntimeError:  # a geometry oneDNN does not implement
        return None


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
        and _geometry(*_key(x_shape, w_shape, strides, padding, dilation)) is not None
    )


def _key(x_shape, w_shape, strides, padding, dilation):
    return (
        tuple(x_shape),
        tuple(w_shape),
        tuple(strides),
        tuple(tuple(p) for p in padding),
        tuple(dilation),
    )


# -- XLA FFI handlers ---------------------------------------------------------------------
# Each (geometry, kernel) pair is an XLA custom call target whose handler is a ctypes
# function: XLA passes its own buffers' addresses, so nothing is copied. The structures
# follow jaxlib's include/xla/ffi/api/c_api.h.


class _ExtensionBase(ctypes.Structure):
    pass


_ExtensionBase._fields_ = [
    ("struct_size", ctypes.c_size_t),
    ("type", ctypes.c_int),
    ("next", ctypes.POINTER(_ExtensionBase)),
]


class _ApiVersion(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", _P),
        ("major_version", ctypes.c_int),
        ("minor_version", ctypes.c_int),
    ]


class _Metadata(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("api_version", _ApiVersion),
        ("traits", ctypes.c_uint32),
        ("state_type_id", ctypes.c_int64),
    ]


class _MetadataExtension(ctypes.Structure):
    _fields_ = [("extension_base", _ExtensionBase), ("metadata", ctypes.POINTER(_Metadata))]


class _Buffer(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", _P),
        ("dtype", ctypes.c_int),
        ("data", _P),
        ("rank", ctypes.c_int64),
        ("dims", ctypes.POINTER(ctypes.c_int64)),
    ]


class _List(ctypes.Structure):  # XLA_FFI_Args and XLA_FFI_Rets
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", _P),
        ("size", ctypes.c_int64),
        ("types", _P),
        ("items", ctypes.POINTER(ctypes.POINTER(_Buffer))),
    ]


class _CallFrame(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.POINTER(_ExtensionBase)),
        ("api", _P),
        ("ctx", _P),
        ("stage", ctypes.c_int),
        ("args", _List),
        ("rets", _List),
    ]


_HANDLER = ctypes.CFUNCTYPE(_P, ctypes.POINTER(_CallFrame))
_METADATA_EXTENSION = 1
_EXECUTE = 3  # XLA_FFI_ExecutionStage_EXECUTE
_FFI_MAJOR = 0  # the XLA FFI major version these structures follow
_registration = threading.Lock()
_handlers: dict[tuple[str, str], tuple[str, object]] = {}


@functools.cache
def _ffi_api_version() -> tuple[int, int] | None:
    """XLA FFI's (major, minor) API version from the running jaxlib's header, or ``None``
    when the header is missing or declares a major version the structures above were not
    written for (then oneDNN is not used)."""
    header = Path(jax.ffi.include_dir()) / "xla" / "ffi" / "api" / "c_api.h"
    numbers = {}
    try:
        for line in header.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "#define" and parts[1].startswith("XLA_FFI_API_M"):
                numbers[parts[1]] = int(parts[2])
        version = numbers["XLA_FFI_API_MAJOR"], numbers["XLA_FFI_API_MINOR"]
    except (OSError, KeyError, ValueError):
        return None
    # Minor versions only add fields at the ends of structures (c_api.h); checked: 0.3.
    return version if version[0] == _FFI_MAJOR else None


def _ffi_target(geometry: _Geometry, kernel: str) -> str:
    """The registered custom call target running ``kernel`` of ``geometry``."""
    key = (geometry.name, kernel)
    with _registration:  # two threads lowering the same new geometry register it once
        if key not in _handlers:
            _register(geometry, kernel, key)
    return _handlers[key][0]


def _register(geometry: _Geometry, kernel: str, key: tuple[str, str]) -> None:
    """Register the custom call target running ``kernel`` of ``geometry``."""
    major, minor = _ffi_api_version()
    size = math.prod(geometry.output_shape(kernel))

    def handle(frame_pointer):
        frame = frame_pointer.contents
        if frame.extension_start and frame.extension_start.contents.type == (
            _METADATA_EXTENSION
        ):  # XLA asks which FFI version the handler speaks
            extension = ctypes.cast(
                frame.extension_start, ctypes.POINTER(_MetadataExtension)
            ).contents
            metadata = extension.metadata.contents
            metadata.api_version.major_version = major
            metadata.api_version.minor_version = minor
            metadata.traits = 0
            return None
        if frame.stage != _EXECUTE:
            return None
        out = frame.rets.items[0].contents.data
        with _Activity.lock:
            _Activity.in_flight += 1
        try:
            a, b = (frame.args.items[i].contents.data for i in range(2))
            geometry.run(kernel, a, b, out)
        except BaseException as error:  # nothing may escape into XLA: poison the result
            array = ctypes.cast(out, ctypes.POINTER(ctypes.c_float * size)).contents
            np.frombuffer(array, np.float32).fill(np.nan)
            if isinstance(error, KeyboardInterrupt):  # ctypes would swallow a Ctrl-C here
                _thread.interrupt_main()
            else:
                logging.getLogger(__name__).exception("oneDNN %s failed", kernel)
        finally:
            with _Activity.lock:
                _Activity.in_flight -= 1
                _Activity.last = time.monotonic()
        return None

    callback = _HANDLER(handle)
    # Named after the geometry, so that an executable from JAX's persistent compilation
    # cache finds the same kernel under the same name in another process.
    name = f"jax_spectral_onednn_{kernel}_{geometry.name}"
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(callback), platform="cpu")
    _handlers[key] = (name, callback)  # keeps the callback alive


# -- primitives ---------------------------------------------------------------------------

conv_p = jex_core.Primitive("onednn_conv")
input_grad_p = jex_core.Primitive("onednn_conv_input_grad")
kernel_grad_p = jex_core.Primitive("onednn_conv_kernel_grad")


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
        return jax.core.ShapedArray(expected[2], jnp.float32)

    return abstract_eval


@functools.lru_cache(maxsize=256)
def _eager_call(primitive, params: tuple) -> Callable:
    return jax.jit(functools.partial(primitive.bind, **dict(params)))


def _eager(primitive):
    def impl(a, b, **params):  # outside jit: one compiled call per geometry, reused
        return _eager_call(primitive, tuple(sorted(params.items())))(a, b)

    return impl


def _lowering(primitive):
    def lower(ctx, a, b, **params):
        geometry = _geometry(*_key(**params))
        target = _ffi_target(geometry, _KERNELS[primitive])
        return jax.ffi.ffi_lowering(target)(ctx, a, b)

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
