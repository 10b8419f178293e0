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

The number of samples in a batch is the length of the leading axis of its first leaf.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np

PyTree = Any

__all__ = ["BatchStream", "SplitArrays", "batch_size_of", "is_array_data", "split_arrays"]


def _is_array(x: Any) -> bool:
    return isinstance(x, (np.ndarray, jax.Array)) or (
        hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "__array__")
    )


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
        return bool(leaves) and all(_is_array(leaf) for leaf in leaves)
    return False


def batch_size_of(batch: PyTree) -> int:
    """Number of samples in ``batch``: the leading dimension of its first leaf."""
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        raise ValueError(f"a batch must contain at least one array, got {type(batch).__name__}.")
    shape = np.shape(leaves[0])
    if len(shape) == 0:
        raise ValueError(
            "the first leaf of a batch is a scalar; batches need a leading sample axis "
            "(shape (batch, ...))."
        )
    return int(shape[0])


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


class BatchStream:
    """A re-iterable source of batches, read from the host once per pass.

    Each call of ``iter(stream)`` starts a new pass over the data. Hashing and equality
    are by identity, so a stream can sit in the static part of a pytree. ``num_samples``
    is recorded by the first full pass of an operator, which checks later passes against it.
    """

    num_samples: int | None = None

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
        return iter(self._new_pass())

    def first(self) -> PyTree:
        """The first batch of a new pass; raises ``ValueError`` if the data is empty."""
        for batch in self:
            return batch
        raise ValueError("data is empty: iterating it yielded no batches.")
