"""The linear-operator protocol that every algorithm accepts, and operators built from it.

An operator is a symmetric linear map on flat vectors of length ``dim``:

* ``matvec(v)``: ``(dim,) -> (dim,)``; ``matmat(V)``: ``(k, dim) -> (k, dim)``, row by row;
* ``dim`` (int) and ``dtype`` (the products' floating dtype);
* ``traceable``: whether ``matvec`` can run under ``jit``/``vmap``/``lax.scan``;
* ``ravel(tree)`` and ``unravel(v)``: between flat vectors and params-shaped pytrees.

Implementations are registered pytrees whose arrays are leaves, so a jitted algorithm
takes them as arguments, never as compiled-in constants. :func:`check_operator` is the
one rule by which lanczos, slq, eigenpairs, hutchinson, hutchpp, estimate and checkpoint
fingerprints recognise an operator: an object with a callable ``matvec`` and an integer
``dim``. ``dtype``, ``traceable``, ``matmat`` and ``ravel``/``unravel`` are optional for
user classes (float32 (float64 under x64), ``True``, a vmap or a loop of ``matvec``, and
none); :func:`dtype_of`, :func:`is_traceable` and :func:`matmat` apply those defaults.

Operators compose: ``A + B``, ``A - B``, ``c * A`` and ``A + lam`` (``A + lam I``, a
damped operator) for operators of one layout, so the residual ``H - G`` of the
Gauss-Newton decomposition is one expression.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from .validate import count

PyTree = Any

__all__ = [
    "FunctionOperator",
    "IdentityOperator",
    "LinearOperator",
    "SumOperator",
    "as_operator",
    "check_operator",
    "dtype_of",
    "identity",
    "is_operator",
    "is_traceable",
    "matmat",
]


@runtime_checkable
class LinearOperator(Protocol):
    """What jax-spectral's algorithms call on an operator (see the module notes)."""

    @property
    def dim(self) -> int: ...

    @property
    def dtype(self) -> np.dtype: ...

    @property
    def traceable(self) -> bool: ...

    def matvec(self, v: jax.Array) -> jax.Array: ...

    def matmat(self, vectors: jax.Array) -> jax.Array: ...

    def ravel(self, tree: PyTree) -> jax.Array: ...

    def unravel(self, v: jax.Array) -> PyTree: ...


def is_operator(obj: Any) -> bool:
    """Whether ``obj`` is an operator (a callable ``matvec`` and a ``dim``) rather than a
    plain function: the one rule every algorithm uses."""
    return callable(getattr(obj, "matvec", None)) and hasattr(obj, "dim")


def check_operator(obj: Any) -> Any:
    """``obj`` if it is an operator whose ``dim`` is a positive int and whose ``dtype`` (if
    any) is real floating; ``TypeError``/``ValueError`` naming the fault otherwise."""
    if not is_operator(obj):
        raise TypeError(
            f"expected an operator (an object with matvec and dim), got {type(obj).__name__}."
        )
    dim = obj.dim
    count("the operator's dim", dim)
    dtype = dtype_of(obj)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"the operator's dtype must be real floating, got {dtype}.")
    return obj


def check_hashable(obj: Any, name: str) -> None:
    """``TypeError`` unless ``obj`` is hashable: functions that compiled programs take as
    static arguments (losses, models, products) must be."""
    try:
        hash(obj)
    except TypeError:
        raise TypeError(
            f"{name} must be hashable (a function or functools.partial), got an unhashable "
            f"{type(obj).__name__}; wrap it in a function."
        ) from None


def dtype_of(obj: Any) -> np.dtype:
    """The operator's ``dtype``, or JAX's default float for one without it."""
    dtype = getattr(obj, "dtype", None)
    return np.dtype(jnp.zeros(()).dtype if dtype is None else dtype)


def is_traceable(obj: Any) -> bool:
    """The operator's ``traceable`` (``True`` for one without it)."""
    return bool(getattr(obj, "traceable", True))


def matmat(obj: Any, vectors: jax.Array) -> jax.Array:
    """``obj``'s product with each row of ``vectors``: its own ``matmat`` where it has one,
    else ``vmap`` of ``matvec`` (traceable) or a loop."""
    if hasattr(obj, "matmat"):
        return obj.matmat(vectors)
    if is_traceable(obj):
        return jax.vmap(obj.matvec)(vectors)
    return jnp.stack([obj.matvec(v) for v in vectors])


def passes_as_argument(obj: Any) -> bool:
    """Whether ``obj`` is a pytree of arrays (numbers included), which ``jit`` takes as an
    argument."""
    leaves = jax.tree_util.tree_leaves(obj)
    return all(isinstance(x, (jax.Array, np.ndarray, np.generic, numbers.Number)) for x in leaves)


def as_argument(obj: Any) -> Any:
    """``obj`` if it is a pytree of arrays (a jitted algorithm takes it as an argument),
    else ``obj`` behind a static wrapper: a user class that is not a registered pytree is
    then part of the compiled program (its arrays become constants), as a plain function
    would be, identified by the content of what it holds (see
    :func:`jax_spectral.checkpoint.object_digest`), so changing it recompiles. A sum
    wraps only such terms."""
    if isinstance(obj, SumOperator):  # only the terms that are not pytrees go static
        return SumOperator(tuple(as_argument(t) for t in obj.terms), obj.coefficients)
    if passes_as_argument(obj):
        return obj
    from .checkpoint import object_digest

    return StaticOperator(_Identity(obj), object_digest(obj))


class _Identity:
    """An object compared by identity (a user class's own ``__eq__`` may compare arrays)."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _Identity) and other.obj is self.obj

    def __hash__(self) -> int:
        return id(self.obj)


@functools.partial(jax.tree_util.register_dataclass, data_fields=[], meta_fields=["ref", "digest"])
@dataclasses.dataclass(frozen=True, eq=False)
class StaticOperator:
    """A user operator that is not a pytree of arrays, as a static part of a program. The
    digest of everything it holds is part of its identity: after the object changes, the
    program is compiled anew (and a checkpoint tells the two apart)."""

    ref: _Identity
    digest: str

    @property
    def inner(self) -> Any:
        return self.ref.obj

    @property
    def dim(self) -> int:
        return int(self.inner.dim)

    @property
    def dtype(self) -> np.dtype:
        return dtype_of(self.inner)

    @property
    def traceable(self) -> bool:
        return is_traceable(self.inner)

    def matvec(self, v: jax.Array) -> jax.Array:
        return self.inner.matvec(v)

    def matmat(self, vectors: jax.Array) -> jax.Array:
        return matmat(self.inner, vectors)

    def __getattr__(self, name: str) -> Any:  # ravel, unravel, layout where it has them
        if name in ("ref", "digest", "inner"):
            raise AttributeError(name)
        return getattr(self.ref.obj, name)


def layout_of(obj: Any) -> Any:
    """The params layout (treedef and leaf shapes/dtypes) of an operator, or ``None``."""
    return getattr(obj, "layout", None) or None


class OperatorAlgebra:
    """``+``, ``-`` and scalar ``*`` for operators; ``A + lam`` is ``A + lam I``."""

    def __add__(self, other: Any) -> SumOperator:
        return _sum([(1.0, self), (1.0, _as_term(other, self))])

    def __radd__(self, other: Any) -> SumOperator:
        return _sum([(1.0, _as_term(other, self)), (1.0, self)])

    def __sub__(self, other: Any) -> SumOperator:
        return _sum([(1.0, self), (-1.0, _as_term(other, self))])

    def __rsub__(self, other: Any) -> SumOperator:
        return _sum([(1.0, _as_term(other, self)), (-1.0, self)])

    def __neg__(self) -> SumOperator:
        return _sum([(-1.0, self)])

    def __mul__(self, scalar: Any) -> SumOperator:
        return _sum([(_scalar(scalar), self)])

    __rmul__ = __mul__


def _scalar(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"operators are scaled by real Python numbers, got {type(value).__name__}; "
            "a matrix product of two operators is not supported."
        )
    if not np.isfinite(value):
        raise ValueError(f"the scale must be finite, got {value!r}.")
    return float(value)


def _as_term(other: Any, like: Any) -> Any:
    if is_operator(other):
        return other
    return _scalar(other) * identity(like)


def _sum(terms: list[tuple[float, Any]]) -> SumOperator:
    flat: list[tuple[float, Any]] = []
    for coefficient, term in terms:
        if isinstance(term, SumOperator):
            pairs = zip(term.coefficients, term.terms, strict=True)
            flat += [(coefficient * c, t) for c, t in pairs]
        else:
            flat.append((coefficient, check_operator(term)))
    first = flat[0][1]
    for _, term in flat[1:]:
        if term.dim != first.dim:
            raise ValueError(
                f"operators of different sizes cannot be added: dim {first.dim} and {term.dim}."
            )
        a, b = layout_of(first), layout_of(term)
        if a is not None and b is not None and a != b:
            raise ValueError(
                "operators on different parameter layouts cannot be added (the same dim, but "
                "other leaves or another order: the entries would be misaligned); build both "
                "on the same params (and the same wrt=)."
            )
    return SumOperator(tuple(t for _, t in flat), tuple(c for c, _ in flat))


class _Layout:
    """ravel/unravel from a stored ``layout`` (treedef, ((shape, dtype), ...))."""

    layout: Any

    @property
    def unravel(self) -> Callable[[jax.Array], PyTree]:
        if not self.layout:
            raise AttributeError("this operator has no params layout; it works on flat vectors.")
        return unraveler(*self.layout)

    def ravel(self, tree: PyTree) -> jax.Array:
        if not self.layout:
            raise AttributeError("this operator has no params layout; it works on flat vectors.")
        return ravel_checked(self.layout, tree, self.dtype)

    def matvec_tree(self, v: PyTree) -> PyTree:
        """The product for a params-shaped pytree ``v``; returns a params-shaped pytree."""
        return self.unravel(self.matvec(self.ravel(v)))


@functools.lru_cache(maxsize=256)
def unraveler(treedef: Any, avals: tuple) -> Callable[[jax.Array], PyTree]:
    """``ravel_pytree``'s inverse for a layout, jitted (eagerly, unravelling dispatches a
    split and one reshape per leaf; under a trace the jit is inlined)."""
    template = jax.tree_util.tree_unflatten(treedef, [np.zeros(s, d) for s, d in avals])
    return jax.jit(ravel_pytree(template)[1])


def layout(params: PyTree) -> tuple[Any, tuple]:
    """The layout of a params pytree: its treedef and its leaves' shapes and dtypes."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    return treedef, tuple((tuple(np.shape(x)), jnp.result_type(x)) for x in leaves)


def ravel_checked(layout: tuple, tree: PyTree, dtype: Any) -> jax.Array:
    """``tree`` flattened in ``ravel_pytree`` order; ``ValueError`` for a pytree of another
    structure or other leaf shapes than ``layout``."""
    from .hvp import check_like

    treedef, avals = layout
    template = jax.tree_util.tree_unflatten(
        treedef, [jax.ShapeDtypeStruct(shape, d) for shape, d in avals]
    )
    check_like(template, tree, "the pytree")
    return ravel_pytree(tree)[0].astype(dtype)


def _real_array(v: Any, name: str) -> jax.Array:
    """``v`` as an array; ``TypeError`` for a pytree or a complex array."""
    if isinstance(v, (dict, list, tuple)) or not (
        isinstance(v, (jax.Array, np.ndarray, np.generic)) or hasattr(v, "__array__")
    ):
        raise TypeError(
            f"{name} takes flat arrays, got {type(v).__name__}; for a params-shaped "
            "pytree use matvec_tree (or ravel first)."
        )
    v = jnp.asarray(v)
    if not (jnp.issubdtype(v.dtype, jnp.floating) or jnp.issubdtype(v.dtype, jnp.integer)):
        raise TypeError(
            f"{name} takes real vectors, got {v.dtype} (the imaginary part would be "
            "dropped); apply it to the real and imaginary parts separately."
        )
    return v


def check_vector(v: Any, dim: int, name: str = "matvec") -> jax.Array:
    """``v`` as a real ``(dim,)`` array, or a clear error."""
    v = _real_array(v, name)
    if v.shape != (dim,):
        raise ValueError(f"{name} expects a vector of shape ({dim},), got {v.shape}.")
    return v


def check_vectors(vectors: Any, dim: int, name: str = "matmat") -> jax.Array:
    """``vectors`` as a real ``(k, dim)`` array, or a clear error."""
    vectors = _real_array(vectors, name)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ValueError(f"{name} expects shape (k, {dim}), got {vectors.shape}.")
    return vectors


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["terms"],
    meta_fields=["coefficients"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class SumOperator(_Layout, OperatorAlgebra):
    """``sum_i coefficients[i] * terms[i]``: operators of one size and layout (made by
    ``+``, ``-`` and ``*`` on operators)."""

    terms: tuple
    coefficients: tuple

    @property
    def dim(self) -> int:
        return int(self.terms[0].dim)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(jnp.result_type(*[dtype_of(t) for t in self.terms]))

    @property
    def traceable(self) -> bool:
        return all(is_traceable(t) for t in self.terms)

    @property
    def layout(self) -> Any:
        return next((layout_of(t) for t in self.terms if layout_of(t) is not None), ())

    def _shaped(self) -> Any:
        return next((t for t in self.terms if layout_of(t) is not None), None)

    @property
    def unravel(self) -> Callable[[jax.Array], PyTree]:
        term = self._shaped()
        if term is None:
            raise AttributeError("this operator has no params layout; it works on flat vectors.")
        return term.unravel

    def ravel(self, tree: PyTree) -> jax.Array:
        term = self._shaped()
        if term is None:
            raise AttributeError("this operator has no params layout; it works on flat vectors.")
        return term.ravel(tree).astype(self.dtype)

    def matvec(self, v: jax.Array) -> jax.Array:
        v = check_vector(v, self.dim)
        return self._combine([t.matvec(v) for t in self.terms])

    __call__ = matvec

    def matmat(self, vectors: jax.Array) -> jax.Array:
        vectors = check_vectors(vectors, self.dim)
        return self._combine([matmat(t, vectors) for t in self.terms])

    def _combine(self, products: list[jax.Array]) -> jax.Array:
        dtype = self.dtype
        total = sum(
            jnp.asarray(c, dtype) * jnp.asarray(p, dtype)
            for c, p in zip(self.coefficients, products, strict=True)
        )
        return jnp.asarray(total, dtype)


class _Sized:
    """``dim`` and ``dtype`` from static ``size`` and ``kind`` (a dtype's name) fields."""

    size: int
    kind: str

    @property
    def dim(self) -> int:
        return self.size

    @property
    def dtype(self) -> np.dtype:
        return jnp.dtype(self.kind)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=[], meta_fields=["size", "kind", "layout"]
)
@dataclasses.dataclass(frozen=True, eq=False)
class IdentityOperator(_Sized, _Layout, OperatorAlgebra):
    """The identity on vectors of length ``size`` (for damping: ``H + lam * identity(H)``)."""

    size: int
    kind: str  # the dtype's name (a static, hashable field)
    layout: Any = ()

    traceable = True

    def matvec(self, v: jax.Array) -> jax.Array:
        return check_vector(v, self.dim).astype(self.dtype)

    __call__ = matvec

    def matmat(self, vectors: jax.Array) -> jax.Array:
        return check_vectors(vectors, self.dim).astype(self.dtype)


def identity(like: Any) -> IdentityOperator:
    """The identity with ``like``'s size, dtype and params layout (``like``: an operator)."""
    check_operator(like)
    return IdentityOperator(int(like.dim), dtype_of(like).name, layout_of(like) or ())


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["args"],
    meta_fields=["fn", "size", "kind", "layout", "traceable"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class FunctionOperator(_Sized, _Layout, OperatorAlgebra):
    """``v -> fn(v, *args)`` as an operator; ``args`` are its pytree leaves (see
    :func:`as_operator`)."""

    args: tuple
    fn: Callable
    size: int
    kind: str
    layout: Any = ()
    traceable: bool = True

    def matvec(self, v: jax.Array) -> jax.Array:
        v = check_vector(v, self.dim).astype(self.dtype)
        out = self.fn(v, *self.args)
        if getattr(out, "shape", None) != (self.dim,):
            raise ValueError(
                f"the operator's function returned shape {getattr(out, 'shape', type(out))}, "
                f"expected ({self.dim},)."
            )
        return out

    __call__ = matvec

    def matmat(self, vectors: jax.Array) -> jax.Array:
        vectors = check_vectors(vectors, self.dim).astype(self.dtype)
        if self.traceable:
            return jax.vmap(self.matvec)(vectors)
        return jnp.stack([self.matvec(v) for v in vectors])


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["base", "vectors"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True, eq=False)
class DeflatedOperator(_Layout, OperatorAlgebra):
    """``P A P`` with ``P = I - V^T V``: ``base`` (``A``) with the directions of the
    orthonormal rows of ``vectors`` (``V``, shape ``(k, dim)``) removed (see
    :func:`deflate`)."""

    base: Any
    vectors: jax.Array

    @property
    def dim(self) -> int:
        return int(self.base.dim)

    @property
    def dtype(self) -> np.dtype:
        return dtype_of(self.base)

    @property
    def traceable(self) -> bool:
        return is_traceable(self.base)

    @property
    def layout(self) -> Any:
        return layout_of(self.base) or ()

    def project(self, vectors: jax.Array) -> jax.Array:
        """``P x`` for each row of ``vectors`` (or for one vector)."""
        v = self.vectors.astype(jnp.promote_types(self.vectors.dtype, vectors.dtype))
        x = vectors.astype(v.dtype)
        return (x - (x @ v.T) @ v).astype(vectors.dtype)

    def matvec(self, v: jax.Array) -> jax.Array:
        v = check_vector(v, self.dim).astype(self.dtype)
        return self.project(self.base.matvec(self.project(v)))

    __call__ = matvec

    def matmat(self, vectors: jax.Array) -> jax.Array:
        vectors = check_vectors(vectors, self.dim).astype(self.dtype)
        return self.project(matmat(self.base, self.project(vectors)))

    def linearized(self, budget: int | None = None) -> DeflatedOperator:
        """The base linearised for a run (see ``CurvatureOperator.linearized``)."""
        from .operators import CurvatureOperator

        if not isinstance(self.base, (CurvatureOperator, DeflatedOperator)):
            return self  # a user's operator: its own method of that name may mean another thing
        return dataclasses.replace(self, base=self.base.linearized(budget))


def flat_rows(operator: Any, vectors: Any, what: str = "vectors") -> np.ndarray:
    """``vectors`` (or an :class:`jax_spectral.Eigenpairs`' vectors) as float64 ``(k,
    dim)`` rows, ``k >= 1``: flat already, or params-shaped pytrees with a leading ``k``
    axis (as ``eigenpairs`` returns them for a curvature operator), flattened by the
    operator's ``ravel``; one flat vector is one row. ``ValueError`` naming ``what`` for
    another shape, or NaN or Inf."""
    vectors = getattr(vectors, "vectors", vectors)
    if isinstance(vectors, (np.ndarray, jax.Array)):
        rows = np.asarray(vectors, dtype=np.float64)
    else:
        ravel = getattr(operator, "ravel", None)
        if ravel is None:
            raise TypeError(f"{what} as pytrees need an operator with ravel(); pass flat rows.")
        leaves = jax.tree_util.tree_leaves(vectors)
        num = leaves[0].shape[0] if leaves else 0
        rows = [ravel(jax.tree_util.tree_map(lambda a, i=i: a[i], vectors)) for i in range(num)]
        rows = np.asarray(np.stack(rows), dtype=np.float64) if rows else np.zeros((0, 0))
    rows = rows[None] if rows.ndim == 1 else rows
    dim = int(operator.dim)
    if rows.ndim != 2 or rows.shape[1] != dim or rows.shape[0] == 0:
        raise ValueError(
            f"{what} must be (k, {dim}) rows with k >= 1 (flat, or Eigenpairs), got shape "
            f"{rows.shape}."
        )
    if not np.all(np.isfinite(rows)):
        raise ValueError(f"the {what} contain NaN or Inf.")
    return rows


def deflate(operator: Any, vectors: Any) -> DeflatedOperator:
    """``operator`` with the directions of ``vectors`` removed: ``P A P``, ``P = I - Q Q^T``
    for an orthonormal basis ``Q`` of the span of ``vectors`` (``(k, dim)`` rows, or an
    :class:`jax_spectral.Eigenpairs` whose vectors are used). Its spectrum is ``A``'s on the
    complement of that span, plus ``k`` zeros; :func:`jax_spectral.slq` with ``deflate=``
    starts its probes in the complement, so the zeros carry no weight and the density is
    the bulk's alone, resolved at the same order (the outliers no longer stretch it). With
    exact top eigenvectors, the complement's spectrum is the rest of ``A``'s.
    """
    check_operator(operator)
    vectors = flat_rows(operator, vectors, "vectors to deflate")
    if vectors.shape[0] >= vectors.shape[1]:
        raise ValueError(
            f"deflating {vectors.shape[0]} vectors of length {vectors.shape[1]} leaves no "
            "complement to run on; deflate fewer than dim."
        )
    q = nested_basis(vectors, "vectors to deflate")
    dtype = jnp.promote_types(dtype_of(operator), jnp.float32)
    return DeflatedOperator(as_argument(operator), jnp.asarray(q.T, dtype))


def nested_basis(rows: np.ndarray, what: str = "vectors") -> np.ndarray:
    """Orthonormal ``(dim, k)`` columns whose first ``j`` span the first ``j`` of the
    ``(k, dim)`` ``rows``, for every ``j`` (QR); ``ValueError`` when the rows are linearly
    dependent (to 1e-8 of the largest)."""
    q, r = np.linalg.qr(rows.T)
    diag = np.abs(np.diag(r))
    rank = int(np.sum(diag > 1e-8 * max(diag.max(), 1e-300)))
    if rank < rows.shape[0]:
        raise ValueError(
            f"the {rows.shape[0]} {what} are linearly dependent: they span only {rank} "
            "dimensions; pass linearly independent vectors (distinct Ritz vectors)."
        )
    return q


def as_operator(
    fn: Callable,
    *args: PyTree,
    dim: int | None = None,
    like: PyTree | None = None,
    dtype: Any = None,
    traceable: bool = True,
) -> FunctionOperator:
    """An operator ``v -> fn(v, *args)`` on flat vectors (matfree's ``matvec(v, *params)``
    style): the arrays in ``args`` are the operator's pytree leaves, so a jitted algorithm
    takes them as arguments (a function closing over them would compile them in as
    constants, and a checkpoint fingerprint could not see them).

    ``dim`` (or ``like``, a params pytree whose ``ravel_pytree`` length is the size and
    which gives the operator ``ravel``/``unravel``) sets the size; ``dtype`` defaults to
    ``like``'s or JAX's default float. ``fn`` must be symmetric and linear in ``v``; set
    ``traceable=False`` for a function that cannot run under ``jit``.

    >>> import jax.numpy as jnp
    >>> A = jnp.diag(jnp.arange(1.0, 4.0))
    >>> op = as_operator(lambda v, m: m @ v, A, dim=3)
    >>> op.matvec(jnp.ones(3))
    Array([1., 2., 3.], dtype=float32)
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}.")
    check_hashable(fn, "fn")
    stored = ()
    if like is not None:
        flat = ravel_pytree(like)[0]
        if dim is not None and int(dim) != flat.shape[0]:
            raise ValueError(f"dim={dim} but like= has {flat.shape[0]} entries.")
        dim = flat.shape[0]
        dtype = flat.dtype if dtype is None else dtype
        stored = layout(like)
    if dim is None:
        raise ValueError("as_operator needs dim= (or like=params) for the vector length.")
    dim = count("dim", dim)
    dtype = np.dtype(jnp.zeros(()).dtype if dtype is None else dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be real floating, got {dtype}.")
    args = jax.tree_util.tree_map(jnp.asarray, args)
    return FunctionOperator(tuple(args), fn, int(dim), dtype.name, stored, bool(traceable))
