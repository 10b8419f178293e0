"""Checkpoints of a Lanczos (or SLQ) recurrence, so that a killed run loses at most a few steps.

A checkpoint folder holds

* ``basis-SSSSSS-EEEEEE.npy``: the Lanczos vectors ``v_S .. v_{E-1}`` (for SLQ, of every
  probe), each file written once, when those rows are final;
* ``state.npz``: the small part of the state (``alpha``, ``beta``, counters, scale), the
  settings, a fingerprint of the operator and its data and of the start vectors, and the
  SHA-256 of every basis file.

Every file is written under a temporary name and renamed (``os.replace``), and
``state.npz`` last (its bytes fsync'd before the rename): a run killed at any moment, even
mid-write, leaves the previous checkpoint intact. Writing only the new basis rows keeps the
cost of a checkpoint in proportion to the steps since the last one, and the writes run on
a background thread while the next steps compute (one write in flight at most; the run
waits for the last).

Resuming loads the state, checks each basis file's name, rows, shape and hash, and refuses
(``ValueError``) a checkpoint written for other settings, another operator or data, or
other start vectors, naming what differs. The recurrence then continues with the same
compiled step on the same values, so the resumed tridiagonal equals the uninterrupted one
bit for bit.

A run holds an exclusive lock on the folder (``fcntl.flock`` on ``.lock``, which names its
process) from start to end, so a second run on the same folder is refused
(``RuntimeError``) instead of racing the first for the files.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import json
import os
import re
import types
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .data import Unwrapping, static_values
from .validate import write_atomic

__all__ = ["Checkpointer", "fingerprint"]

_FORMAT = 1
_SEGMENT_NAME = re.compile(r"basis-(\d{6})-(\d{6})\.npy")


def _hash_update(digest, value: Any) -> None:
    if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        digest.update(str(value.dtype).encode())
        value = jax.random.key_data(value)
    if isinstance(value, jax.Array) and not (
        value.is_fully_addressable or value.is_fully_replicated
    ):  # split over several processes: this process's shards (the run's own fingerprint)
        layout = getattr(value.sharding, "spec", value.sharding)
        digest.update(f"{value.dtype}{value.shape}{layout}".encode())
        for shard in sorted(value.addressable_shards, key=lambda s: repr(s.index)):
            digest.update(repr(shard.index).encode())
            digest.update(np.ascontiguousarray(np.asarray(shard.data)).tobytes())
        return
    if isinstance(value, (np.ndarray, jax.Array)) or np.isscalar(value):
        array = np.asarray(value)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    else:
        digest.update(repr(value).encode())


def _describe_code(code: Any) -> str:
    """A code object: its bytecode, the names it reads and its constants (nested code
    objects, such as inner functions, described the same way)."""
    parts = [code.co_code.hex(), repr(code.co_names)]
    for const in code.co_consts:
        parts.append(_describe_code(const) if hasattr(const, "co_code") else repr(const))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _describe_function(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    name = name or type(fn).__qualname__
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    body = _describe_code(code) if code is not None else ""
    return f"{getattr(fn, '__module__', '')}.{name}:{body}"


_ATOMS = (type(None), bool, int, float, complex, str, bytes)
_LIBRARIES = ("jax", "jaxlib", "builtins", "numpy", "functools", "optax")
_MAX_DEPTH = 12


class _Walk:
    """The state of one description: objects seen (a shared object is written as a
    reference to its first visit, by order, so two structures that differ only in which
    object they share differ here too)."""

    def __init__(self):
        self.seen: dict[int, int] = {}
        self.keep: list = []  # keeps visited objects alive, so ids are not reused


def _describe_value(digest, value: Any, walk: _Walk | None = None, depth: int = 0) -> None:
    """Hash what a Python value holds: arrays (and array-likes) by content, numbers and
    strings by value, containers and objects (their ``__dict__``, slots and class data)
    recursively, functions by name, bytecode, constants and the values they capture
    (closure cells, defaults, a partial's arguments, a bound method's object). What cannot
    be seen into (too deep, opaque objects, tracers) is hashed with its identity, so a
    checkpoint written by another process is refused rather than resumed wrongly."""
    walk = _Walk() if walk is None else walk
    if _describe_leaf(digest, value):
        return
    if id(value) in walk.seen:
        digest.update(f"<ref {walk.seen[id(value)]}>".encode())
        return
    walk.seen[id(value)] = len(walk.seen)
    walk.keep.append(value)
    if depth > _MAX_DEPTH:
        digest.update(f"opaque:{id(value)}:{os.getpid()}".encode())
        return

    def inner(item):
        _describe_value(digest, item, walk, depth + 1)

    for applies, describe in _DESCRIBERS:
        if applies(value):
            describe(digest, value, inner)
            return
    _describe_object(digest, value, inner)


def _describe_leaf(digest, value: Any) -> bool:
    """Hash a value that holds no others (a tracer by identity, arrays by content, atoms
    by value); False for anything else."""
    if isinstance(value, jax.core.Tracer):
        digest.update(f"tracer:{id(value)}:{os.getpid()}".encode())
    elif isinstance(value, (np.ndarray, jax.Array, np.generic)):
        _hash_update(digest, value)
    elif isinstance(value, _ATOMS):
        digest.update(f"{type(value).__name__}:{value!r};".encode())
    else:
        return False
    return True


# The describers of :func:`_describe_value`, each ``(digest, value, inner)``, where
# ``inner(item)`` describes a value held one level deeper.


def _describe_sequence(digest, value, inner) -> None:
    digest.update(f"{type(value).__name__}[{len(value)}]".encode())
    for item in value:
        inner(item)


def _describe_buffer(digest, value, inner) -> None:
    digest.update(b"bytes:" + bytes(value))


def _describe_unordered(digest, value, inner) -> None:
    """A set or dict, its items in the order of their own digests (not of addresses)."""
    keys = list(value)
    digests = [object_digest(k) for k in keys]
    digest.update(f"{type(value).__name__}[{len(value)}]".encode())
    for _, key in sorted(zip(digests, range(len(keys)), strict=True)):
        inner(keys[key])
        if isinstance(value, dict):
            inner(value[keys[key]])


def _describe_partial(digest, value, inner) -> None:
    digest.update(b"partial")
    for part in (value.func, value.args, value.keywords):
        inner(part)


def _describe_python_function(digest, value, inner) -> None:
    """A function or method: its code and what it captures (closure cells, defaults, the
    object a method is bound to)."""
    digest.update(_describe_function(value).encode())
    function = getattr(value, "__func__", value)
    cells = [c.cell_contents for c in (getattr(function, "__closure__", None) or ()) if _filled(c)]
    for part in (
        cells,
        getattr(function, "__defaults__", None),
        getattr(function, "__kwdefaults__", None),
        getattr(value, "__self__", None),
    ):
        inner(part)


def _describe_array_like(digest, value, inner) -> None:
    """A tf.Tensor, a torch tensor: by content when it converts, else its identity."""
    try:
        _hash_update(digest, np.asarray(value))
    except Exception:  # noqa: BLE001 - not convertible: its identity
        digest.update(f"opaque:{id(value)}:{os.getpid()}".encode())


def _describe_library_callable(digest, value, inner) -> None:
    """A library's callable (a jitted function, a ufunc, a builtin method): its name, what
    it wraps and the object it is bound to; not its caches."""
    digest.update(_describe_function(value).encode())
    inner(getattr(value, "__wrapped__", None))
    owner = getattr(value, "__self__", None)
    if owner is not None and not isinstance(owner, types.ModuleType):
        inner(owner)


def _describe_named(digest, value, inner) -> None:
    """A class or module, by its qualified name."""
    name = getattr(value, "__qualname__", value.__name__)
    digest.update(f"{getattr(value, '__module__', '')}.{name}".encode())


def _describe_object(digest, value, inner) -> None:
    """Any other object: its class and its fields (see :func:`_object_fields`), or its
    identity when it has nothing to see."""
    kind = type(value)
    digest.update(f"{kind.__module__}.{kind.__qualname__}".encode())
    fields = _object_fields(value)
    if fields:
        inner(fields)
    elif not hasattr(value, "__dict__"):  # nothing to see: its identity
        digest.update(f"opaque:{id(value)}:{os.getpid()}".encode())


def _object_fields(value: Any) -> dict:
    """An object's ``__dict__`` and slots, and its class's own data and methods (user
    classes; a library's are its version)."""
    kind = type(value)
    fields = dict(getattr(value, "__dict__", {}))
    for cls in kind.__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if slot not in ("__dict__", "__weakref__") and hasattr(value, slot):
                fields[slot] = getattr(value, slot)
    for cls in kind.__mro__:
        if cls is object or cls.__module__.split(".")[0] in _LIBRARIES:
            continue
        for name, member in vars(cls).items():
            if not name.startswith("__") and name not in fields:
                fields[f"{cls.__qualname__}.{name}"] = member
    return fields


def _is_library_callable(value: Any) -> bool:
    return callable(value) and type(value).__module__.split(".")[0] in _LIBRARIES


# (applies, describe): the first that applies describes the value (the order matters: a
# functools.partial is also a library's callable, a namedtuple also an object); anything
# else is described by _describe_object.
_DESCRIBERS = (
    (lambda v: isinstance(v, (list, tuple, collections.deque)), _describe_sequence),
    (lambda v: isinstance(v, (bytearray, memoryview)), _describe_buffer),
    (lambda v: isinstance(v, (set, frozenset, dict)), _describe_unordered),
    (lambda v: isinstance(v, functools.partial), _describe_partial),
    (lambda v: hasattr(v, "__code__") or hasattr(v, "__func__"), _describe_python_function),
    (lambda v: hasattr(v, "__array__") and not isinstance(v, type), _describe_array_like),
    (_is_library_callable, _describe_library_callable),
    (lambda v: isinstance(v, (type, types.ModuleType)), _describe_named),
)


def _filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def object_digest(value: Any) -> str:
    """A SHA-256 of :func:`_describe_value` (for static user operators: a changed object is
    another program and another checkpoint identity)."""
    digest = hashlib.sha256()
    _describe_value(digest, value)
    return digest.hexdigest()


def _describe_loss(operator: Any, digest) -> None:
    """The loss as a computation: its jaxpr on the first batch (so closures, captured
    constants and ``functools.partial`` arguments count, and a renamed but equal function
    does not), with the values of the arrays it captures."""
    from .operators import first_batch

    if operator.stream is not None:
        batch = operator.stream.first()
    else:
        batch = first_batch(operator.stacked, operator.remainder)
    closed = jax.make_jaxpr(Unwrapping(operator.loss))(operator.params, batch)
    digest.update(re.sub(r" at 0x[0-9a-fA-F]+", "", str(closed.jaxpr)).encode())
    # (the batches' Python values, data.Static, are hashed with the data)
    for const in closed.consts:
        _hash_update(digest, const)
    for value in _literals(closed.jaxpr):  # printed as [...] when JAX inlines array constants
        _hash_update(digest, value)


def _literals(jaxpr) -> Any:
    """The values of the literal operands of ``jaxpr`` and of the jaxprs nested in it.
    (Derivative rules and callbacks are Python functions in the equations' parameters:
    their names count, values they capture do not.)"""
    from ._jaxapi import Literal
    from .operators import all_equations

    for eqn in all_equations(jaxpr):
        for var in eqn.invars:
            if isinstance(var, Literal):
                yield np.asarray(var.val)


def fingerprint(operator: Any) -> str:
    """A SHA-256 over what determines the operator's products: for a Hessian operator its
    loss (as a jaxpr with its captured constants), settings (with its CPU rewrite when that
    changes the products: a CNN's, not an MLP's), parameters and in-memory batches (for a
    stream: the content of a whole pass, see :class:`jax_spectral.data.StreamContent`); for
    anything else (a ``Partial``, a plain function, a user operator) what it holds, by
    :func:`_describe_value`: its arrays, numbers, containers and functions, with the values
    a function captures (closure cells, defaults); not module globals it reads."""
    from .linop import FunctionOperator, IdentityOperator, StaticOperator, SumOperator

    digest = hashlib.sha256()
    if isinstance(operator, StaticOperator):  # a user class that is not a pytree
        _hash_update(digest, ("user operator", int(operator.dim), str(operator.dtype)))
        digest.update(operator.digest.encode())  # object_digest: everything it holds
    elif isinstance(operator, SumOperator):
        _hash_update(digest, ("sum", operator.coefficients))
        for term in operator.terms:
            digest.update(fingerprint(term).encode())
    elif isinstance(operator, IdentityOperator):
        _hash_update(digest, ("identity", operator.size, operator.kind))
    elif isinstance(operator, FunctionOperator):
        _describe_value(digest, operator.fn)
        _hash_update(digest, (operator.size, operator.kind))
        for leaf in jax.tree_util.tree_leaves(operator.args):
            _hash_update(digest, leaf)
    elif hasattr(operator, "stream") and hasattr(operator, "loss"):
        _describe_loss(operator, digest)
        settings = [operator.reduce, operator.batch_size, operator.num_samples]
        if getattr(operator, "kind", "hessian") != "hessian" or operator.select is not None:
            # (a Hessian of all parameters hashes as it always did)
            settings.append((operator.kind, operator.select, _product_settings(operator)))
        if _rewritten_products(operator):  # the products differ from the stock ones
            settings.append(("rewrite", operator.rewrite))
        for setting in settings:
            _hash_update(digest, setting)
        if operator.stream is not None:
            # The whole pass's content (read once now if no pass has run): the samples as a
            # multiset when reshuffling them cannot change the matrix, else the batches.
            content = operator.stream.read()
            form = operator.loss_form()
            if form == operator.reduce:  # any regrouping of the samples: the same matrix
                kept = content.samples
            elif form is not None and len(content.batch_sizes) == 1:  # equal batches
                kept = (content.samples, tuple(content.batch_sizes))
            else:
                kept = content.batches
            _hash_update(digest, (content.num_samples, kept))
        batches = [operator.stacked, _whole_remainder(operator)]
        for leaf in jax.tree_util.tree_leaves([operator.params, batches]):
            _hash_update(digest, leaf)
        statics = static_values(batches)
        if statics:  # the batches' Python values (a stream's are in its sample hashes)
            digest.update(repr(statics).encode())
    else:  # a Partial, a plain function, a user operator registered as a pytree
        _describe_value(digest, operator)
    return digest.hexdigest()


def _whole_remainder(operator: Any) -> Any:
    """The remainder batch as the data holds it: on a mesh its tail (see
    ``operators._cut_tail``) joined back, so the fingerprint does not depend on the number
    of devices. Split over several processes, the two parts are hashed as they are."""
    head, tail = operator.remainder, operator.tail
    if tail is None:
        return head
    if not all(getattr(a, "is_fully_addressable", True) for a in jax.tree_util.tree_leaves(head)):
        return [head, tail]
    return jax.tree_util.tree_map(
        lambda a, b: np.concatenate([np.asarray(a), np.asarray(b)]), head, tail
    )


def _product_settings(operator: Any) -> Any:
    """What a Gauss-Newton or Fisher product adds to its loss: the output loss's name and
    reduction and the Monte-Carlo draws (the model and loss are in the loss's jaxpr)."""
    product = operator.product
    out_loss = getattr(product, "out_loss", None)
    if out_loss is None:
        return None
    return (out_loss.name, out_loss.reduce, getattr(product, "mc_samples", None))


def _rewritten_products(operator: Any) -> bool:
    """Whether the products evaluate a rewritten loss (the operator records what its
    rewrite changed)."""
    return getattr(operator, "rewrite", "none") != "none"


@functools.partial(jax.jit, static_argnums=(2, 3))
def _snapshot(state, start, count, axis):
    """Copies of the new basis rows and of the small fields, in one dispatch."""
    rows = jax.lax.dynamic_slice_in_dim(state.basis, start, count, axis=axis)
    small = {f: jnp.copy(getattr(state, f)) for f in state._fields if f != "basis"}
    return rows, small


def local_columns(sharding: Any, shape: tuple) -> list[tuple[int, int]] | None:
    """The column ranges (last axis) of an array of ``shape`` laid out as ``sharding``
    that this process holds, when the array spans several processes (``None`` when it is
    all here). Only the last axis may be split: ``ValueError`` otherwise."""
    if sharding is None or sharding.is_fully_addressable:
        return None
    ranges = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        *others, last = (index[i] if i < len(index) else slice(None) for i in range(len(shape)))
        if any(s.indices(n) != (0, n, 1) for s, n in zip(others, shape, strict=False)):
            raise ValueError(
                "checkpoints of a basis split over several processes need its rows kept "
                f"whole (basis_sharding splitting only the last axis); got {sharding.spec}."
            )
        ranges.add(last.indices(shape[-1])[:2])
    return sorted(ranges)


def _host_part(array: Any, columns: list | None) -> np.ndarray:
    """``array`` on the host: whole, or this process's ``columns`` side by side."""
    if columns is None:
        return np.asarray(jax.device_get(array))
    shards = {}
    for shard in array.addressable_shards:
        shards.setdefault(shard.index[-1].indices(array.shape[-1])[:2], shard.data)
    return np.concatenate([np.asarray(shards[c]) for c in columns], axis=-1)


def _global_from_part(part: np.ndarray, shape: tuple, sharding: Any, columns: list) -> Any:
    """The global array whose columns this process holds as ``part`` (see _host_part)."""
    offsets, at = {}, 0
    for start, stop in columns:
        offsets[(start, stop)] = at
        at += stop - start

    def block(index):
        start, stop = index[-1].indices(shape[-1])[:2]
        at = offsets[(start, stop)]
        return part[..., at : at + stop - start]

    return jax.make_array_from_callback(shape, sharding, block)


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64:  # a SHA-256
        return value[:12] + "..."
    return repr(value)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class Checkpointer:
    """Saves and restores one recurrence's state in ``folder``.

    ``settings`` (JSON-serialisable) and ``identity`` (fingerprints of the operator and the
    start vectors) must match on resume. ``rows_axis`` is the basis axis that counts steps
    (0 for one run, 1 for SLQ's ``(probes, order, dim)``).
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        settings: dict,
        identity: dict,
        rows_axis: int,
        keep_previous: bool = False,
    ):
        self.folder = Path(folder)
        # keep the state before the last as well (a run over several processes, whose
        # copies a kill can catch one save apart: they resume from the older one)
        self.keep_previous = keep_previous
        self._base: bytes | None = None  # the state file this run last loaded or wrote
        self.settings = settings
        self.identity = identity
        self.rows_axis = rows_axis
        self.segments: list[dict] = []
        self.rows_saved = 0
        # a basis split over several processes: the column ranges this process saves
        self.columns: list | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._lock: Any = None

    def lock(self) -> None:
        """Take the folder for this run (created if missing); ``RuntimeError`` when another
        process holds it. Released by :meth:`close` (or when the process ends)."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        handle = open(self.folder / ".lock", "a+")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RuntimeError(
                f"the checkpoint folder {self.folder} is in use by {holder}; one run per "
                "folder: wait for it to end, or give this run another folder."
            ) from None
        handle.truncate(0)
        handle.write(f"process {os.getpid()}")
        handle.flush()
        self._lock = handle

    @property
    def state_file(self) -> Path:
        return self.folder / "state.npz"

    @property
    def previous_file(self) -> Path:
        return self.folder / "state-previous.npz"

    def exists(self) -> bool:
        return self.state_file.is_file()

    def saved_steps(self) -> list[tuple[int, Path]]:
        """``(next_step, file)`` of the last state written and, with ``keep_previous``, of
        the one before it (the files that can be read, latest first)."""
        found = []
        for path in (self.state_file, self.previous_file):
            if path.is_file():
                try:
                    meta, _ = self._read_state(path)
                except ValueError:
                    continue
                found.append((int(meta["next_step"]), path))
        return found

    # -- writing ----------------------------------------------------------------------
    def save(self, state: Any, next_step: int, done: bool, background: bool = True) -> None:
        """Record the state after steps ``0 .. next_step - 1`` (rows ``0 .. next_step`` of
        the basis are final).

        Copies are taken on the device here, before the next steps reuse (donate) the
        state; with ``background``, one thread moves them to the host and writes the files
        while the next steps run. At most one write is in
        flight: a failure of the previous write is raised here, and :meth:`flush` waits for
        the last. Without ``background`` the write happens here.
        """
        self.flush()
        self.folder.mkdir(parents=True, exist_ok=True)
        basis = state.basis
        self.columns = local_columns(getattr(basis, "sharding", None), basis.shape)
        order = basis.shape[self.rows_axis]
        rows_final = min(next_step + 1, order)
        count = max(rows_final - self.rows_saved, 0)
        rows, small = _snapshot(state, np.int32(self.rows_saved), count, self.rows_axis)
        new_rows = None
        if count:
            new_rows = (self.rows_saved, rows_final, rows)
            self.rows_saved = rows_final
        if not background:  # the caller's own loop needs the interpreter (see run_checkpointed)
            self._write(new_rows, small, next_step, done)
            return
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending = self._writer.submit(self._write, new_rows, small, next_step, done)

    def flush(self) -> None:
        """Wait for the write in flight, raising its error if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None
            if self._lock is not None:
                self._lock.close()  # releases the flock
                self._lock = None

    def _write(self, new_rows, small, next_step, done) -> None:
        small = jax.device_get(small)  # waits for the computation
        if new_rows is not None:
            start, stop, rows = new_rows
            rows = _host_part(rows, self.columns)
            name = f"basis-{start:06d}-{stop:06d}.npy"
            data = _npy_bytes(rows)
            # Not fsync'd (that cost most of a checkpoint): a process kill cannot lose it,
            # and after a power loss a segment that did not reach the disk fails its
            # SHA-256 check, so resuming reports the checkpoint corrupt instead of misusing it.
            write_atomic(self.folder / name, lambda tmp: tmp.write_bytes(data))
            self.segments.append(
                {
                    "file": name,
                    "start": start,
                    "stop": stop,
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
        meta = {
            "format": _FORMAT,
            "settings": self.settings,
            "identity": self.identity,
            "next_step": int(next_step),
            "done": bool(done),
            "segments": list(self.segments),
            "columns": self.columns,
        }
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.array(json.dumps(meta)), **small)
        if self.keep_previous:  # the state this run stood on before, not whatever is there
            base = self._base
            if base is None:
                self.previous_file.unlink(missing_ok=True)  # an older run's
            else:
                write_atomic(self.previous_file, lambda tmp: tmp.write_bytes(base), durable=True)
            self._base = buffer.getvalue()
        write_atomic(self.state_file, lambda tmp: tmp.write_bytes(buffer.getvalue()), durable=True)

    # -- reading ----------------------------------------------------------------------
    def load(self, template: Any, path: Path | None = None) -> tuple[Any, int, bool]:
        """``(state, next_step, done)`` from the folder (the last state written, or the
        state file ``path``), shaped like ``template``."""
        path = path or self.state_file
        meta, small = self._read_state(path)
        self._check_written_for_this_run(meta)
        shape, sharding = template.basis.shape, getattr(template.basis, "sharding", None)
        columns = local_columns(sharding, shape)
        saved = meta.get("columns")
        if (saved is None and columns is not None) or (
            saved is not None and [tuple(c) for c in saved] != columns
        ):
            raise ValueError(
                f"the checkpoint in {self.folder} holds basis columns {saved or 'all'}, and "
                f"this process holds {columns or 'all'} now: resume with the same devices, "
                "processes and basis_sharding."
            )
        width = shape[-1] if columns is None else sum(b - a for a, b in columns)
        basis = np.zeros(shape[:-1] + (width,), template.basis.dtype)
        for segment in meta["segments"]:
            self._read_segment(segment, basis)
        fields = {}
        for field in template._fields:
            reference = getattr(template, field)
            value = basis if field == "basis" else small.get(field)
            expected = basis.shape if field == "basis" else reference.shape
            if value is None or value.shape != expected or value.dtype != reference.dtype:
                raise ValueError(f"the checkpoint in {self.folder} is corrupt: field {field!r}.")
            if field == "basis" and columns is not None:
                fields[field] = _global_from_part(value, shape, sharding, columns)
            else:
                fields[field] = jax.numpy.asarray(value)
        self.segments = list(meta["segments"])
        self.rows_saved = max((s["stop"] for s in self.segments), default=0)
        self._base = path.read_bytes() if self.keep_previous else None
        return type(template)(**fields), int(meta["next_step"]), bool(meta["done"])

    def _read_state(self, path: Path) -> tuple[dict, dict]:
        """A state file's metadata and small fields; ``ValueError`` if it cannot be read or
        has another format."""
        try:
            with np.load(path, allow_pickle=False) as saved:
                meta = json.loads(str(saved["meta"]))
                small = {name: saved[name] for name in saved.files if name != "meta"}
        except Exception as err:  # a truncated or foreign file
            raise ValueError(
                f"the checkpoint in {self.folder} is unreadable or corrupt ({err})."
            ) from None
        if meta.get("format") != _FORMAT:
            raise ValueError(f"the checkpoint in {self.folder} has format {meta.get('format')}.")
        return meta, small

    def _check_written_for_this_run(self, meta: dict) -> None:
        """Refuse a checkpoint of other settings, or of another operator, data or start
        vectors, naming each key that differs."""
        for what, mine, theirs in (
            ("settings", self.settings, meta["settings"]),
            ("operator, data or start vectors", self.identity, meta["identity"]),
        ):
            if mine != theirs:
                diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
                detail = ", ".join(
                    f"{k}: now {_short(mine.get(k))}, saved {_short(theirs.get(k))}" for k in diff
                )
                raise ValueError(
                    f"the checkpoint in {self.folder} was written for different {what} "
                    f"({detail}); resume only the same run, or use another folder."
                )

    def _read_segment(self, segment: dict, basis: np.ndarray) -> None:
        """Check one basis file's recorded name and rows, its SHA-256, shape and dtype, and
        copy its rows into ``basis``."""
        where, rows = self.folder, basis.shape[self.rows_axis]
        name, start, stop = segment.get("file"), segment.get("start"), segment.get("stop")
        named = _SEGMENT_NAME.fullmatch(name) if isinstance(name, str) else None
        if not (
            named and (int(named[1]), int(named[2])) == (start, stop) and 0 <= start < stop <= rows
        ):
            raise ValueError(
                f"the checkpoint in {where} is corrupt: a basis segment is recorded as "
                f"{name!r}, rows {start!r} to {stop!r} (expected basis-SSSSSS-EEEEEE.npy "
                f"in the folder, rows within 0..{rows})."
            )
        path = self.folder / name
        if not path.is_file() or _sha256(path) != segment["sha256"]:
            raise ValueError(
                f"the checkpoint in {where} is corrupt: {name} is missing or does not "
                "match its recorded SHA-256."
            )
        index = [slice(None)] * basis.ndim
        index[self.rows_axis] = slice(start, stop)
        values = np.load(path, allow_pickle=False)
        if values.shape != basis[tuple(index)].shape or values.dtype != basis.dtype:
            raise ValueError(
                f"the checkpoint in {where} is corrupt: {name} holds {values.dtype} "
                f"{values.shape}, not {basis.dtype} {basis[tuple(index)].shape}."
            )
        basis[tuple(index)] = values
