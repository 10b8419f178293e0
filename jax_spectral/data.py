"""Turning user data into batches for the dataset-wide operators.

Two kinds of data are accepted:

* **In-memory arrays**: a pytree of arrays (``(X, y)``, a dict, a single array) that share
  a leading sample axis, with a ``batch_size``. The samples are cut into ``N // batch_size``
  equal batches, stacked along a new leading axis so that one ``lax.scan`` can run over them
  inside ``jit``, plus one exact remainder batch of ``N % batch_size`` samples. Without a
  ``batch_size`` the whole array pytree is one batch.
* **Streams**: any re-iterable of batches, read from the host once per pass: a list of
  ``(x, y)`` tuples, a callable that returns a fresh iterator on every call, a
  ``tf.data.Dataset`` (iterated with ``as_numpy_iterator``), or any object whose
  ``__iter__`` starts a new pass. A one-shot iterator (a generator, ``iter(list)``) is
  rejected: its second pass would be empty.

A list whose batches are all in-memory arrays of one structure, with equal batches and at
most a smaller last one, is read once and becomes in-memory data (:func:`stack_batches`):
the equal batches stacked for ``lax.scan``, the last one as the remainder. Each batch keeps
its own samples, so a loss that uses batch statistics sees the same batches.

Array-likes that are not NumPy or JAX arrays (a ``tf.Tensor``, a CPU ``torch.Tensor``,
anything with ``__array__``) are converted with ``numpy.asarray``, once per batch and pass.
The number of samples in a batch is the length of the leading axis of its first leaf that
has one.

Every pass over a stream is fingerprinted as it is read (:class:`StreamContent`): a 64-bit
hash per sample, from which follow the multiset of batches and the multiset of samples.
The operator compares each pass with the first, so a stream that hands out other data on a
later pass (a random subset, ``shuffle().take(n)``) is refused instead of mixing matrices.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = [
    "BatchStream",
    "HostOnlyError",
    "SplitArrays",
    "StreamContent",
    "Static",
    "Unwrapping",
    "as_host_arrays",
    "batch_size_of",
    "is_array_data",
    "split_arrays",
    "stack_batches",
    "static_values",
    "unwrap_static",
]


class HostOnlyError(ValueError):
    """Raised when an operator that reads its batches from the host is traced."""


def _is_array(x: Any) -> bool:
    return isinstance(x, (np.ndarray, jax.Array)) or (
        hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "__array__")
    )


def _is_scalar(x: Any) -> bool:
    return isinstance(x, (bool, int, float, complex, str, bytes))


def is_array_data(data: Any) -> bool:
    """True for an array, or a tuple/dict (nested) whose leaves are all arrays.

    Lists are never array data: a list is read as a sequence of batches, as in the
    original package's ``[(X, y)]``.
    """
    if isinstance(data, list):
        return False
    if _is_array(data):
        return True
    if isinstance(data, (tuple, dict)):
        leaves = jax.tree_util.tree_leaves(data, is_leaf=lambda x: isinstance(x, list))
        arrays = [_is_array(leaf) for leaf in leaves]
        # Python scalars and strings beside the arrays are held as they are (Static)
        return any(arrays) and all(a or _is_scalar(x) for a, x in zip(arrays, leaves, strict=True))
    return False


class Static:
    """A batch leaf that is not an array (a Python bool or number, a string), held as
    part of the batch's structure: a pytree node without leaves, so ``jit`` does not trace
    it and the loss receives it unchanged (:func:`unwrap_static`). Equal values give equal
    structures; an unhashable value is compared by identity."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def _key(self):
        try:
            hash(self.value)
        except TypeError:
            return (type(self.value), id(self.value))
        return (type(self.value), self.value)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Static) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Static({self.value!r})"


jax.tree_util.register_pytree_node(Static, lambda s: ((), s), lambda s, _: s)


def unwrap_static(batch: PyTree) -> PyTree:
    """``batch`` with each :class:`Static` replaced by its value, as the user passed it."""
    return jax.tree_util.tree_map(
        lambda x: x.value if isinstance(x, Static) else x,
        batch,
        is_leaf=lambda x: isinstance(x, Static),
    )


@dataclasses.dataclass(frozen=True)
class Unwrapping:
    """``fn(params, batch, *rest)`` called with :func:`unwrap_static` of ``batch``: how the
    engine hands its batches to a user's loss or model (hashable, as ``fn`` is)."""

    fn: Callable

    def __call__(self, params: PyTree, batch: PyTree, *rest: Any) -> Any:
        return self.fn(params, unwrap_static(batch), *rest)


def static_values(batch: PyTree) -> list:
    """The values of the :class:`Static` leaves of ``batch``, in order (for fingerprints:
    they are part of the data, though not arrays)."""
    is_static = lambda x: isinstance(x, Static)  # noqa: E731
    return [x.value for x in jax.tree_util.tree_leaves(batch, is_leaf=is_static) if is_static(x)]


def as_host_arrays(batch: PyTree) -> PyTree:
    """``batch`` with every array-like leaf that is not a NumPy or JAX array (a
    ``tf.Tensor``, a CPU ``torch.Tensor``, anything with ``__array__``) converted by
    ``numpy.asarray``; other leaves (Python numbers, strings) are held as :class:`Static`,
    so that the loss receives them unchanged."""

    def convert(x):
        if isinstance(x, (np.ndarray, jax.Array, Static)):
            return x
        if not hasattr(x, "__array__"):
            return Static(x)
        try:
            return np.asarray(x)
        except Exception as err:
            raise TypeError(
                f"a batch leaf of type {type(x).__module__}.{type(x).__name__} could not be "
                f"converted to a NumPy array ({type(err).__name__}: {err}); pass NumPy or JAX "
                "arrays, or tensors that numpy.asarray accepts (on the CPU, without gradients)."
            ) from None

    return jax.tree_util.tree_map(convert, batch, is_leaf=lambda x: isinstance(x, Static))


def batch_size_of(batch: PyTree) -> int:
    """Number of samples in ``batch``: the leading dimension of its first leaf that has
    one (leaves without an axis, such as a per-batch scalar or key, are skipped)."""
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        raise ValueError(f"a batch must contain at least one array, got {type(batch).__name__}.")
    for leaf in leaves:
        if np.ndim(leaf) >= 1:
            return int(np.shape(leaf)[0])
    raise ValueError(
        "no leaf of the batch has a leading sample axis (all are scalars); batches need "
        "arrays of shape (batch, ...)."
    )


_STACK_SHARE = 0.25  # of the device's free memory: larger lists stay streams


def _signature(batch: PyTree) -> list:
    return [
        (np.shape(x), str(getattr(x, "dtype", type(x)))) for x in jax.tree_util.tree_leaves(batch)
    ]


def stack_batches(batches: Any) -> SplitArrays | None:
    """A list of in-memory batches as stacked equal batches plus a smaller last one.

    The equal batches must have leaves of identical shapes and dtypes (they are stacked);
    the last, smaller one is kept whole as the remainder. Returns ``None`` for anything
    else, which is then read as a stream: not a list, a batch that is not a pytree of
    arrays, batches of different structures, shapes or dtypes, other sizes, or a list whose
    stacked copy would take more than a quarter of the default device's free memory.
    Raises ``ValueError`` for a list holding an iterator (a generator inside the list).
    """
    if not isinstance(batches, list) or not batches:
        return None
    for i, batch in enumerate(batches):
        if isinstance(batch, Iterator):
            raise ValueError(
                f"item {i} of the data list is a one-shot iterator ({type(batch).__name__}); "
                "a list holds batches (arrays, or tuples/dicts of arrays). Pass a callable "
                "that returns a fresh iterator of batches instead of a list of them."
            )
    if not all(is_array_data(b) for b in batches):
        return None
    # Python values as Static first: batches whose values differ have other structures
    batches = [as_host_arrays(b) for b in batches]
    treedef = jax.tree_util.tree_structure(batches[0])
    if any(jax.tree_util.tree_structure(b) != treedef for b in batches[1:]):
        return None
    sizes = [batch_size_of(b) for b in batches]
    size = sizes[0]
    if min(sizes) == 0 or any(n != size for n in sizes[:-1]) or sizes[-1] > size:
        return None
    full = batches if sizes[-1] == size else batches[:-1]
    if any(_signature(b) != _signature(full[0]) for b in full[1:]):
        return None
    nbytes = sum(
        int(np.prod(np.shape(x))) * getattr(getattr(x, "dtype", None), "itemsize", 8)
        for x in jax.tree_util.tree_leaves(batches)
    )
    from .costs import free_device_bytes

    free = free_device_bytes()
    if free is not None and nbytes > _STACK_SHARE * free:
        return None

    def stack(*leaves):
        on_device = any(isinstance(x, jax.Array) for x in leaves)
        return (jnp.stack if on_device else np.stack)(leaves)

    stacked = jax.tree_util.tree_map(stack, *full)
    remainder = batches[-1] if sizes[-1] < size else None
    return SplitArrays(stacked, remainder, int(sum(sizes)), int(size))


class SplitArrays(NamedTuple):
    """In-memory data cut into equal stacked batches and one remainder batch."""

    stacked: PyTree | None  # leaves of shape (num_full, batch_size, ...), or None
    remainder: PyTree | None  # leaves of shape (N % batch_size, ...), or None
    num_samples: int  # N
    batch_size: int


def split_arrays(arrays: PyTree, batch_size: int | None) -> SplitArrays:
    """Cut a pytree of arrays with a shared leading axis into stacked batches.

    ``batch_size=None`` keeps all samples in one batch.
    """
    arrays = as_host_arrays(arrays)  # Python scalars beside the arrays become Static
    leaves = jax.tree_util.tree_leaves(arrays)
    if not leaves:
        raise ValueError("data holds no arrays.")
    sizes = {int(np.shape(leaf)[0]) if np.ndim(leaf) else -1 for leaf in leaves}
    if -1 in sizes or len(sizes) != 1:
        shapes = [tuple(np.shape(leaf)) for leaf in leaves]
        raise ValueError(
            "in-memory data must be arrays that share a leading sample axis; "
            f"got leaves of shapes {shapes}."
        )
    (n,) = sizes
    if n == 0:
        raise ValueError("data is empty: the arrays have 0 samples.")
    if batch_size is None:
        batch_size = n
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool):
        raise TypeError(f"batch_size must be a positive int, got {batch_size!r}.")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    batch_size = min(int(batch_size), n)
    num_full, rest = divmod(n, batch_size)
    cut = num_full * batch_size
    stacked = jax.tree_util.tree_map(
        lambda a: np.asarray(a)[:cut].reshape((num_full, batch_size) + np.shape(a)[1:]), arrays
    )
    remainder = jax.tree_util.tree_map(lambda a: np.asarray(a)[cut:], arrays) if rest else None
    return SplitArrays(stacked, remainder, n, batch_size)


_KEYS = np.zeros(0, np.uint64)


def _keys(width: int) -> np.ndarray:
    """Fixed pseudo-random 64-bit keys, one per 8-byte word of a sample."""
    global _KEYS
    if _KEYS.size < width:
        rng = np.random.default_rng(0x5EC7)
        size = max(width, 2 * _KEYS.size, 64)
        _KEYS = rng.integers(0, 2**64, size=size, dtype=np.uint64, endpoint=False) | np.uint64(1)
    return _KEYS[:width]


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, elementwise (wrapping uint64 arithmetic)."""
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_hashes(batch: PyTree) -> np.ndarray:
    """A 64-bit hash of each sample of a host batch, shape ``(n,)``: the bytes, dtype and
    shape of its slice of every leaf (leaves without the sample axis count for every
    sample): the sum over 8-byte words of SplitMix64(word XOR a key for its position).
    Not cryptographic; it tells accidentally different data apart."""
    n = batch_size_of(batch)
    hashes = np.zeros(n, np.uint64)
    statics = static_values(batch)
    if statics:  # Python values count for every sample, as a leaf without a sample axis
        digest = hashlib.sha256(repr(statics).encode()).digest()[:8]
        hashes += np.uint64(int.from_bytes(digest, "little"))
    with np.errstate(over="ignore"):
        for index, leaf in enumerate(jax.tree_util.tree_leaves(batch)):
            if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(
                leaf.dtype, jax.dtypes.prng_key
            ):
                leaf = jax.random.key_data(leaf)
            a = np.ascontiguousarray(np.asarray(leaf))
            per_sample = a.ndim > 0 and a.shape[0] == n
            rows = a.reshape((n, -1) if per_sample else (1, -1)).view(np.uint8)
            pad = -rows.shape[1] % 8
            if pad:
                rows = np.pad(rows, ((0, 0), (0, pad)))
            words = rows.view(np.uint64)
            # Each word mixed with its position's key before the sum: a linear sum would let
            # structured changes cancel (two sign flips, swapped bytes).
            leaf_hash = _mix(words ^ _keys(words.shape[1])).sum(axis=1, dtype=np.uint64)
            tag = f"{index}:{a.dtype.str}:{a.shape[1:] if per_sample else a.shape}"
            tag = np.uint64(int.from_bytes(hashlib.sha256(tag.encode()).digest()[:8], "little"))
            hashes = _mix(hashes * np.uint64(0x9E3779B97F4A7C15) + _mix(leaf_hash + tag))
    return hashes


class StreamContent:
    """What one pass over a stream contained, built batch by batch with :meth:`add`.

    ``batches``: a digest of the multiset of batches (each batch's samples in order), so
    the same batches in another order compare equal. ``samples``: a digest of the multiset
    of samples, equal after any reshuffle of the same samples. ``num_samples``: ``N``;
    ``batch_sizes``: the set of batch sizes.
    """

    def __init__(self) -> None:
        self._batch_digests: list[bytes] = []
        self._sample_hashes: list[np.ndarray] = []
        self.num_samples = 0
        self.batch_sizes: set[int] = set()

    def add(self, batch: PyTree) -> None:
        hashes = sample_hashes(batch)
        self._batch_digests.append(hashlib.sha256(hashes.tobytes()).digest())
        self._sample_hashes.append(hashes)
        self.num_samples += hashes.size
        self.batch_sizes.add(hashes.size)

    def finish(self) -> StreamContent:
        batches = hashlib.sha256(b"".join(sorted(self._batch_digests)))
        hashes = np.sort(np.concatenate(self._sample_hashes or [np.zeros(0, np.uint64)]))
        self.batches = batches.hexdigest()
        self.samples = hashlib.sha256(hashes.tobytes()).hexdigest()
        self.num_batches = len(self._batch_digests)
        del self._batch_digests, self._sample_hashes
        return self


class BatchStream:
    """A re-iterable source of batches, read from the host once per pass.

    Each call of ``iter(stream)`` starts a new pass over the data. Hashing and equality
    are by identity, so a stream can sit in the static part of a pytree. ``content``, the
    :class:`StreamContent` of the first full pass an operator made (or of :meth:`read`),
    is what later passes are checked against.
    """

    content: StreamContent | None = None
    loss_form: str | None = None  # "mean", "sum" or "" (see HessianOperator.loss_form)

    @property
    def num_samples(self) -> int | None:
        return None if self.content is None else self.content.num_samples

    def __init__(self, source: Any):
        if isinstance(source, BatchStream):
            source = source.source
        if hasattr(source, "as_numpy_iterator"):  # tf.data.Dataset, without importing TF
            self._new_pass: Callable[[], Iterator] = source.as_numpy_iterator
        elif isinstance(source, Iterator):
            raise ValueError(
                f"data is a one-shot iterator ({type(source).__name__}): a second pass over it "
                "would be empty, and Lanczos needs one pass per step. Pass a re-iterable "
                "instead: a list of batches, a callable returning a fresh iterator "
                "(e.g. lambda: make_batches()), or a tf.data.Dataset."
            )
        elif callable(source):
            self._new_pass = lambda: iter(source())
        elif isinstance(source, Iterable):
            self._new_pass = lambda: iter(source)
        else:
            raise TypeError(
                "data must be in-memory arrays (with batch_size), a list of batches, a callable "
                f"returning an iterator of batches, or a tf.data.Dataset; got {type(source)}."
            )
        self.source = source
        if iter(self._new_pass()) is iter(self._new_pass()):
            raise ValueError(
                f"data ({type(source).__name__}) hands out the same iterator on every pass, so "
                "the second pass would find it exhausted. Make the callable create a new "
                "iterator on each call (e.g. lambda: iter(batches) over a list, or a generator "
                "function), or pass the list itself."
            )

    def __iter__(self) -> Iterator[PyTree]:
        return map(as_host_arrays, self._new_pass())

    def read(self) -> StreamContent:
        """The reference content: recorded by the first pass, or read now (data only)."""
        if self.content is None:
            content = StreamContent()
            for batch in self:
                content.add(batch)
            self.content = content.finish()
        return self.content

    def first(self) -> PyTree:
        """The first batch of a new pass; raises ``ValueError`` if the data is empty."""
        for batch in self:
            return batch
        raise ValueError("data is empty: iterating it yielded no batches.")
