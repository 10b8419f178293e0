"""Stochastic Lanczos quadrature: many probes in lockstep, one data pass per step for all.

``slq(op, key, num_probes=n, order=m)`` runs ``n`` Lanczos recurrences from independent
Gaussian start vectors. All probes advance together, so each pass over the data serves
every probe:

* every step calls ``operator.matmat`` once on the ``n`` current Lanczos vectors (each
  batch is read once and its HVP is vmapped over the ``n`` tangents), then a vmapped
  :func:`jax_spectral.lanczos.lanczos_step` advances all recurrences;
* for a traceable operator (in-memory data, ``loop="scan"``) the run is compiled loops
  over steps (:func:`jax_spectral.lanczos.compiled_steps`); for a host-driven operator
  (streams, or convolutional models on CPU) the same step runs from a Python loop.

The scan is over steps with the probes inside it, not a ``vmap`` of the single-probe scan,
which cost more (``benchmarks/bench_slq.py``, ``docs/benchmarks.md``).

Either way probe ``i`` gives the same tridiagonal as ``lanczos(op, keys[i], m)`` run alone,
with ``keys = jax.random.split(key, n)``.

:func:`spectral_density` turns the result into the mean density over probes on one grid,
with its standard error per grid point (the probes' spread over ``sqrt(n)``), using the
conventions of :mod:`jax_spectral.density`.
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._processes import operand_mesh
from .costs import check_fits, estimate, prepared
from .density import eigv_to_density, tridiag_to_eigv
from .lanczos import (
    _PADDED,
    LanczosResult,
    Placement,
    Steps,
    _constrain,
    _place,
    check_finite,
    checkpointer_for,
    column_padding,
    compiled_steps,
    default_tol,
    host_loop,
    init_state,
    interrupted,
    lanczos_step,
    pack_result,
    replicated,
    run_steps,
    warn_if_zero,
)
from .linop import as_argument, check_operator, dtype_of, is_traceable, matmat
from .linop import deflate as deflated
from .progress import Progress, ProgressArg
from .validate import count

__all__ = ["SLQResult", "SpectralDensity", "slq", "spectral_density"]


class SLQResult(NamedTuple):
    """Per-probe Lanczos results and Gauss quadrature rules."""

    lanczos: LanczosResult  # every field with a leading (num_probes,) axis
    # shape=(num_probes, order), float64: the ascending eigenvalues of each probe's valid
    # block T[:k, :k]; after a breakdown at k < order, entries k.. are padding zeros
    nodes: np.ndarray
    weights: np.ndarray  # shape=(num_probes, order), float64; zero on breakdown padding


class SpectralDensity(NamedTuple):
    """A smoothed spectral density averaged over probes."""

    grid: np.ndarray  # shape=(grid_len,)
    density: np.ndarray  # shape=(grid_len,); mean over probes, integrates to one
    stderr: np.ndarray | None  # shape=(grid_len,); standard error of the mean per point

    @classmethod
    def of(cls, density: Any) -> SpectralDensity:
        """``density`` as a :class:`SpectralDensity`: one already (or any object with
        ``grid`` and ``density`` fields, and optionally ``stderr``), or the original
        package's ``(density, grids)`` pair from :func:`jax_spectral.tridiag_to_density`
        (no standard error). The pair's order is checked, since both are arrays of one
        length: its grid must increase strictly, its density be non-negative."""
        if isinstance(density, cls):
            return density
        if hasattr(density, "grid") and hasattr(density, "density"):  # another named type
            return cls(density.grid, density.density, getattr(density, "stderr", None))
        try:
            values, grid = density
            values, grid = np.asarray(values, np.float64), np.asarray(grid, np.float64)
        except (TypeError, ValueError):
            raise TypeError(
                "expected a SpectralDensity or the pair (density, grids) that "
                f"tridiag_to_density returns, got {type(density).__name__}."
            ) from None
        increasing = grid.ndim == 1 and grid.size > 1 and np.all(np.diff(grid) > 0)
        if not increasing or values.shape != grid.shape or np.any(values < 0):
            raise ValueError(
                "a (density, grids) pair needs a strictly increasing 1-D grid second and a "
                "non-negative density of the same length first (tridiag_to_density's order); "
                "a SpectralDensity(grid, density, stderr) names its fields."
            )
        return cls(grid, values, None)


@functools.lru_cache(maxsize=32)
def _many_step(reorthogonalize: bool, tol: float):
    step = functools.partial(lanczos_step, reorthogonalize=reorthogonalize, tol=tol)
    return jax.jit(jax.vmap(step, in_axes=(0, None, 0)), donate_argnums=0)


_init_many = jax.jit(jax.vmap(init_state, in_axes=(0, None)), static_argnums=1)
_pack_many = jax.jit(jax.vmap(pack_result), donate_argnums=0)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _start_vectors(key, num_probes, dim, dtype):
    """Probe ``i`` starts where ``lanczos(op, jax.random.split(key, n)[i], m)`` starts."""
    keys = jax.random.split(key, num_probes)
    return jax.vmap(lambda k: jax.random.normal(k, (dim,), dtype))(keys)


def _matmat(operator, vectors):
    return matmat(operator, vectors)


@functools.partial(jax.jit, static_argnames=("steps",), donate_argnames=("state",))
def _scan_slq(operator, state, start, stop, *, steps):
    """Steps ``start .. stop - 1`` for all probes, as one compiled loop that ends when
    every probe has stopped (traced bounds: one compilation for every segment). The
    bases keep ``steps.basis_sharding``; ``steps.pad`` zero columns, if any, stay zero.

    The operator is a pytree argument: its arrays are inputs, not compiled-in constants.
    """
    vmapped = jax.vmap(
        functools.partial(lanczos_step, reorthogonalize=steps.reorthogonalize, tol=steps.tol),
        in_axes=(0, None, 0),
    )

    def step_fn(state, step, w):
        return _constrain(vmapped(state, step, w), steps.basis_sharding)

    def product(state, step):
        vectors = state.basis[:, step]
        if steps.pad:
            w = _matmat(operator, vectors[:, : vectors.shape[1] - steps.pad])
            return jnp.pad(w.astype(vectors.dtype), ((0, 0), (0, steps.pad)))
        return _matmat(operator, vectors).astype(state.basis.dtype)

    return compiled_steps(product, step_fn, state, start, stop)


def _host_slq(operator, state, start, stop, reorthogonalize, tol, bar, watch, compute=None):
    """All probes' steps from the host (:func:`jax_spectral.lanczos.host_loop`). With
    ``compute`` (a device) the state stays where it is (host memory) and only the probes'
    current vectors and products travel to and from it."""

    def product(state, step):
        vectors = state.basis[:, step]
        if compute is None:
            products = _matmat(operator, vectors)
        else:
            products = jax.device_put(
                _matmat(operator, jax.device_put(vectors, compute)), vectors.sharding
            )
        return products.astype(state.basis.dtype)

    return host_loop(
        product, _many_step(reorthogonalize, tol), state, start, stop, bar=bar, watch=watch
    )


def slq(
    operator: Any,
    key: jax.Array,
    order: int,
    *,
    num_probes: int,
    reorthogonalize: bool = True,
    progress: ProgressArg = False,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
    basis_sharding: jax.sharding.Sharding | None = None,
    basis_memory: str = "device",
    deflate: Any = None,
) -> SLQResult:
    """Stochastic Lanczos quadrature with ``num_probes`` probes of ``order`` steps.

    ``operator`` is an operator from :func:`jax_spectral.hessian_operator`, or any object
    with ``matvec`` (``matmat`` optional), ``dim``, ``dtype`` and ``traceable``; a traceable
    one runs inside ``jit`` and must be a registered pytree. Raises
    ``ValueError`` for a non-positive ``num_probes`` or ``order``, and
    ``FloatingPointError`` naming the step when a product is NaN or Inf, and
    ``MemoryError`` (saying what would fit) when the probes' bases cannot. ``progress`` is
    as for :func:`jax_spectral.lanczos` (one step serves every probe); so are
    ``checkpoint``, ``checkpoint_every`` and ``resume`` (the state of all probes is saved
    together), and so is Ctrl-C: :class:`jax_spectral.Interrupted` carries an
    ``SLQResult`` of the finished steps (the nodes and weights of the shorter rules).

    ``basis_memory="host"`` keeps the probes' Lanczos bases (``num_probes * order * dim``
    entries) in host memory, on JAX's CPU device, where the recurrence runs; the
    accelerator holds only the operator and one vector per probe, which travel to it and
    back each step. For SLQ on models whose bases do not fit the accelerator. It runs
    from the host loop; the results equal the ``"device"`` run to rounding.
    ``basis_sharding`` is as for :func:`jax_spectral.lanczos`, the layout of one probe's
    ``(order, dim)`` basis (for example ``NamedSharding(mesh, PartitionSpec(None,
    "data"))``): every probe's basis is split the same way, zero-padded the same way when
    the devices do not divide ``dim``. Traceable operators only (the scanned loop).

    ``deflate``: eigenvectors to remove before the run, as ``(k, dim)`` rows or an
    :class:`jax_spectral.Eigenpairs` (usually the top ``k``, the outliers): the probes run
    on ``P A P`` (:func:`jax_spectral.deflate`), started in the complement of their span,
    so the result is the density of the rest of the spectrum (the bulk), with every node
    spent on it; its weights sum to one over that complement.

    The probes' products on each batch run a few probes at a time, as many as fit in
    about one probe's working memory (:func:`jax_spectral.operators.tangent_chunk`;
    :func:`jax_spectral.estimate` says how many), so memory does not grow with the
    number of probes beyond their bases and vectors.
    """
    num_probes, order = count("num_probes", num_probes), count("order", order)
    on_host = _placement(basis_sharding, basis_memory)
    operator = as_argument(check_operator(operator))
    if deflate is not None:  # the bulk alone: P A P, the probes started in P's range
        operator = deflated(operator, deflate)
    dtype = jnp.promote_types(dtype_of(operator), jnp.float32)
    cost = estimate(
        operator, order=order, num_probes=num_probes, basis_sharding=basis_sharding, on_host=on_host
    )
    check_fits(cost, num_probes=num_probes, on_host=on_host)
    pad = column_padding(basis_sharding, operator.dim)
    starts = _start_vectors(key, num_probes, operator.dim, dtype)
    if deflate is not None:
        starts = operator.project(starts)
    starts = jnp.pad(starts, ((0, 0), (0, pad)))  # zero columns a sharded basis may need
    if on_host:  # the state on the host's CPU device; the products where the operator is
        starts = jax.device_put(starts, jax.local_devices(backend="cpu")[0])
    elif (mesh := operand_mesh(operator)) is not None:  # several processes
        starts = replicated(mesh, starts, "probe start vector")
    probes_sharding = _probes_sharding(basis_sharding)
    steps = Steps(reorthogonalize, default_tol(dtype), None, probes_sharding, pad)
    traceable = is_traceable(operator) and not on_host
    if basis_sharding is not None and not traceable:
        raise ValueError("basis_sharding= applies to traceable operators (the scanned loop).")
    if basis_sharding is not None and checkpoint is not None:  # each process its columns
        from .checkpoint import local_columns

        local_columns(probes_sharding, (num_probes, order, operator.dim + pad))
    checkpointer = None
    if checkpoint is not None:
        settings = {"kind": "slq", "order": order, "num_probes": num_probes}
        settings.update(dim=int(operator.dim), dtype=str(dtype), basis_memory=basis_memory)
        settings.update(loop="scan" if traceable else "host")
        if pad:  # the bases' columns depend on the number of devices
            settings[_PADDED] = int(operator.dim) + pad
        checkpointer = checkpointer_for(checkpoint, settings, steps, operator, starts, rows_axis=1)
    operator = prepared(operator, cost, on_host)  # batches linearised once for all steps
    what = f"SLQ ({num_probes} probes)"
    with Progress(progress, order, what) as bar:
        advance = _advance(operator, steps, traceable, on_host, bar)
        state, stopped_early = run_steps(
            advance,
            _place(_init_many(starts, order), probes_sharding),
            order,
            bar=bar,
            synced=not traceable,
            checkpointer=checkpointer,
            every=checkpoint_every,
            resume=resume,
            collective=operand_mesh(operator) is not None,
        )
        result = _pack_many(state)
    if stopped_early:
        steps_done = int(np.max(result.num_steps))
        partial = _quadrature(result, order) if steps_done > 0 else None
        raise interrupted(what, steps_done, order, partial, checkpoint)
    warn_if_zero(result)
    check_finite(result, "SLQ")
    return _quadrature(result, order)


def _placement(basis_sharding, basis_memory) -> bool:
    """Whether the bases live in host memory (refused together with a sharding)."""
    placement = Placement.of(basis_sharding, basis_memory)
    if basis_sharding is not None:
        from .operators import check_auto_mesh

        check_auto_mesh(basis_sharding.mesh)
    return placement.on_host


def _probes_sharding(basis_sharding):
    """The layout of the probes' ``(probes, order, dim)`` bases for a ``basis_sharding``
    given, as to :func:`jax_spectral.lanczos`, for one ``(order, dim)`` basis."""
    if basis_sharding is None:
        return None
    spec = jax.sharding.PartitionSpec(None, *basis_sharding.spec)
    return jax.sharding.NamedSharding(basis_sharding.mesh, spec)


def _advance(operator, steps, traceable, on_host, bar):
    """The driver's ``advance(state, start, stop, watch)`` for all probes: compiled
    segments, or the host loop (with the products on the default device when the bases
    are in host memory)."""
    if traceable:

        def advance(state, start, stop, watch):
            state = _scan_slq(operator, state, jnp.int32(start), jnp.int32(stop), steps=steps)
            return state, stop

        return advance
    compute = jax.local_devices()[0] if on_host else None

    def advance(state, start, stop, watch):
        return _host_slq(
            operator,
            state,
            start,
            stop,
            steps.reorthogonalize,
            steps.tol,
            bar,
            watch,
            compute=compute,
        )

    return advance


def _quadrature(result: LanczosResult, order: int) -> SLQResult:
    """Each probe's Gauss quadrature rule from its valid block."""
    tridiag = np.asarray(result.padded_tridiag(), np.float64)
    steps = np.asarray(result.num_steps)
    if np.all(steps == order):
        nodes, weights = tridiag_to_eigv(tridiag)
        return SLQResult(result, nodes, weights)
    # Breakdown (or interrupt) padding sits outside the valid block: the rule is that of
    # the block, padded with zero-weight nodes at zero.
    nodes, weights = np.zeros(tridiag.shape[:2]), np.zeros(tridiag.shape[:2])
    for i, k in enumerate(steps):
        if k > 0:
            valid_nodes, valid_weights = tridiag_to_eigv(tridiag[i, :k, :k][None])
            nodes[i, :k], weights[i, :k] = valid_nodes[0], valid_weights[0]
    return SLQResult(result, nodes, weights)


EDGE_WIDTHS = 5  # kernel widths of grid beyond the extreme nodes (spectral_density)


def spectral_density(
    result: SLQResult,
    *,
    sigma_squared: float = 1e-5,
    grid_len: int = 10000,
    grids: np.ndarray | None = None,
) -> SpectralDensity:
    """Mean density over probes on one grid, with its standard error per grid point.

    The grid spans every probe's nodes of positive weight plus ``EDGE_WIDTHS`` kernel
    widths on each side (at least 0.01, the original package's margin), so that a peak at
    an extreme eigenvalue is drawn whole; the kernel width is set from the grid's span
    (as :func:`jax_spectral.eigv_to_density` does), so all probes share one bandwidth.
    """
    if grids is None:
        grid_len = count("grid_len", grid_len, 2)
        used = np.asarray(result.nodes)[np.asarray(result.weights) > 0]
        if used.size == 0 or not np.all(np.isfinite(used)):
            raise ValueError("no finite node has positive weight; there is no density to draw.")
        low, high = float(used.min()), float(used.max())
        width = np.sqrt(sigma_squared * max(1.0, high - low)) if sigma_squared > 0 else 0.0
        margin = max(1e-2, EDGE_WIDTHS * width)
        grids = np.linspace(low - margin, high + margin, int(grid_len))
    per_probe = np.stack(
        [
            eigv_to_density(n[None], w[None], grids=grids, sigma_squared=sigma_squared)[0]
            for n, w in zip(result.nodes, result.weights, strict=True)
        ]
    )
    n = per_probe.shape[0]
    stderr = per_probe.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.full(len(grids), np.inf)
    return SpectralDensity(np.asarray(grids), per_probe.mean(axis=0), stderr)
