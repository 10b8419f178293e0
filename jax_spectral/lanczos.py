"""The Lanczos algorithm with full reorthogonalisation, as compiled loops over steps.

Given a symmetric operator ``A`` (``matvec(v) = A v``) and a unit start vector ``v_0``,
``m`` steps build an orthonormal basis ``V = [v_0 .. v_{m-1}]`` of the Krylov space and a
symmetric tridiagonal ``T = V^T A V`` with diagonal ``alpha`` and off-diagonal ``beta``:

    A V^T = V^T T + beta_m v_m e_m^T.

Step ``i`` computes ``w = A v_i``, ``alpha_i = v_i . w``,
``w <- w - alpha_i v_i - beta_{i-1} v_{i-1}``, then reorthogonalises ``w`` against the
whole basis by classical Gram-Schmidt (two products with the ``(m, P)`` basis matrix,
never a loop over earlier vectors), repeated once when the first pass removed most of
``w`` (see :func:`_reorthogonalize`), and sets ``beta_i = |w|``,
``v_{i+1} = w / beta_i``. The eigenvalues of ``T`` (Ritz values) approximate the extreme
eigenvalues of ``A``; the eigenvalues and squared first eigenvector components of ``T``
are the nodes and weights of the Gauss quadrature rule for the spectral measure of ``A``
seen from ``v_0`` (see :mod:`jax_spectral.density`).

Breakdown: when ``beta_i <= breakdown_tol * s`` with ``s`` the largest ``|A v_j|`` seen so
far (an estimate of the scale of ``A`` and of ``T``), the Krylov space is invariant to
working precision (for example when ``order`` exceeds the number of distinct eigenvalues,
or the basis has reached the null space of a rank-deficient ``A``): the recurrence stops,
``num_steps`` (``k``) says how many steps are valid, and the result's ``alphas``,
``betas`` and ``basis`` are zero after them; ``LanczosResult.tridiag`` is the valid block
``T[:k, :k]``. No NaN is produced.

Non-finite products: a NaN or Inf from ``matvec`` at step ``i`` stops the recurrence with
``num_steps = i`` and ``nonfinite_step = i``. Called outside ``jit``/``vmap``,
:func:`lanczos` raises :class:`NonFiniteError` naming the step and carrying the result of
the valid steps; under them, ``padded_tridiag()`` is NaN from row and column ``i`` on.

Called eagerly, the recurrence runs under one driver (:func:`run_steps`, shared with SLQ):
compiled segments of timed length or a host loop, with checkpoints, progress and Ctrl-C
(:class:`jax_spectral.Interrupted`, carrying the finished steps) between segments.

The recurrence runs in the dtype of the operator promoted to at least float32 (float32 for
a float32, bfloat16 or float16 model; float64 for a float64 one under x64): half-precision
norms and tolerances would overflow or stop the recurrence at once. Norms are computed with
scaling, so large entries do not overflow. The reorthogonalisation products use
``Precision.HIGHEST`` so that accelerators do not drop to reduced-precision matrix units.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from . import interrupt
from ._processes import all_ok, gather, global_array, operand_mesh, replicate
from .interrupt import Interrupted
from .linop import (
    as_argument,
    check_operator,
    dtype_of,
    is_operator,
    is_traceable,
    passes_as_argument,
)
from .progress import Progress, ProgressArg
from .validate import count

PyTree = Any

__all__ = [
    "LanczosResult",
    "NonFiniteError",
    "lanczos",
    "lanczos_alg",
    "lanczos_step",
    "ritz",
    "warn_if_zero",
]

_HIGHEST = jax.lax.Precision.HIGHEST


class LanczosResult(NamedTuple):
    """The output of :func:`lanczos`: the recurrence's coefficients and basis.

    With ``k = num_steps`` valid steps, ``alphas[:k]`` is the diagonal of the tridiagonal
    ``T_k``, ``betas[:k - 1]`` its off-diagonal and ``basis[:k]`` the Lanczos vectors;
    everything past them is zero. ``betas[k - 1]`` couples ``v_{k-1}`` to the next vector
    (:attr:`residual_norm`; zero after a breakdown). ``nonfinite_step`` is ``-1``, or the
    step whose product was NaN or Inf; the steps before it are valid (outside ``jit``,
    :func:`lanczos` raises :class:`NonFiniteError` carrying this result).

    Results batched over runs (``jax.vmap`` of ``lanczos``, or ``SLQResult.lanczos``) have
    a leading axis on every field.

    With ``basis_sharding`` splitting the columns into ``n`` pieces and ``n`` not dividing
    ``dim``, the basis has ``dim`` rounded up to a multiple of ``n`` columns, the extra
    ones zero (JAX arrays cannot be split unevenly): ``basis[:, :dim]`` are the vectors.
    :func:`ritz` with ``like=`` and :func:`jax_spectral.eigenpairs` drop them.
    """

    alphas: jax.Array  # shape=(order,), recurrence dtype; alpha_0..alpha_{k-1}, zero after
    betas: jax.Array  # shape=(order,); betas[i] couples v_i and v_{i+1}; zero from k on
    basis: jax.Array  # shape=(order, dim) (dim padded by basis_sharding); v_0..v_{k-1}, then 0
    num_steps: jax.Array  # shape=(), int32; k, the number of valid steps
    nonfinite_step: jax.Array  # shape=(), int32; first step with a NaN/Inf product, else -1

    @property
    def tridiag(self) -> jax.Array | np.ndarray:
        """The tridiagonal's valid block ``T[:k, :k]`` (``k = num_steps``), whose
        eigenvalues are the Ritz values.

        Its size is known only where ``k`` is: under ``jit``/``vmap`` (a traced
        ``num_steps``) and for a batch of runs this is :meth:`padded_tridiag` instead.
        """
        if _is_tracer(self.num_steps) or np.ndim(self.num_steps) > 0:
            return self.padded_tridiag()
        k = int(self.num_steps)
        return _tridiag_block(_array_module(self.alphas), self.alphas[:k], self.betas[: k - 1])

    def padded_tridiag(self) -> jax.Array | np.ndarray:
        """``T`` as an ``(..., order, order)`` matrix, the original package's shape: the
        valid block, zeros past it (eigenvalues of the whole matrix include them), and NaN
        in the rows and columns from ``nonfinite_step`` on, so that a failed run cannot
        pass for a spectrum under ``jit``."""
        xp = _array_module(self.alphas)
        padded = xp.vectorize(
            functools.partial(_padded_tridiag, xp), signature="(n),(n),(),()->(n,n)"
        )
        return padded(self.alphas, self.betas, self.num_steps, self.nonfinite_step)

    @property
    def residual_norm(self) -> jax.Array | np.ndarray:
        """``beta_{k-1}``, the coupling of the last valid vector to the next one:
        ``A V_k^T - V_k^T T_k`` has this norm (zero after a breakdown)."""
        xp = _array_module(self.betas)
        k = xp.asarray(self.num_steps)
        last = xp.take_along_axis(self.betas, xp.maximum(k - 1, 0)[..., None], axis=-1)
        return xp.where(k > 0, last[..., 0], 0).astype(self.betas.dtype)


def _array_module(x: Any) -> Any:
    """NumPy for NumPy arrays (a float64 recurrence without x64), else ``jax.numpy``."""
    return np if isinstance(x, np.ndarray) else jnp


def _tridiag_block(xp: Any, alphas: Any, off: Any) -> Any:
    """The symmetric tridiagonal with diagonal ``alphas`` and off-diagonal ``off``."""
    if alphas.shape[0] == 0:
        return xp.zeros((0, 0), alphas.dtype)
    return xp.diag(alphas) + xp.diag(off, 1) + xp.diag(off, -1)


def _padded_tridiag(xp: Any, alphas: Any, betas: Any, k: Any, bad: Any) -> Any:
    """One run's :meth:`LanczosResult.padded_tridiag`."""
    idx = xp.arange(alphas.shape[0])
    tridiag = _tridiag_block(
        xp, xp.where(idx < k, alphas, 0), xp.where(idx[:-1] + 1 < k, betas[:-1], 0)
    )
    poisoned = (bad >= 0) & ((idx[:, None] >= bad) | (idx[None, :] >= bad))
    return xp.where(poisoned, xp.nan, tridiag).astype(alphas.dtype)


class LanczosState(NamedTuple):
    """Carry of the recurrence; one step is :func:`lanczos_step`."""

    basis: jax.Array  # shape=(order, dim); row i is v_i once written
    alphas: jax.Array  # shape=(order,)
    betas: jax.Array  # shape=(order,); betas[i] couples v_i and v_{i+1}
    num_steps: jax.Array  # shape=(), int32
    stopped: jax.Array  # shape=(), bool; breakdown or non-finite product seen
    nonfinite_step: jax.Array  # shape=(), int32; -1 if none
    scale: jax.Array  # shape=(); the largest |A v_j| so far, the scale for breakdown


def _norm(x: jax.Array) -> jax.Array:
    """Euclidean norm with scaling, so that squares of large entries do not overflow."""
    peak = jnp.max(jnp.abs(x))
    return peak * jnp.sqrt(jnp.sum((x / jnp.where(peak > 0, peak, 1)) ** 2))


def init_state(v0: jax.Array, order: int) -> LanczosState:
    """State before step 0, with the normalised start vector as ``v_0``."""
    dtype = v0.dtype
    v0 = v0 / _norm(v0)
    basis = jnp.zeros((order, v0.shape[0]), dtype).at[0].set(v0)
    zeros = jnp.zeros((order,), dtype)
    return LanczosState(
        basis,
        zeros,
        zeros,
        jnp.zeros((), jnp.int32),
        jnp.zeros((), bool),
        -jnp.ones((), jnp.int32),
        jnp.zeros((), dtype),
    )


def _gram_schmidt(basis: jax.Array, w: jax.Array) -> jax.Array:
    """One classical Gram-Schmidt pass: ``w`` less its components along the rows of
    ``basis`` (two products with the whole basis, never a loop over its rows)."""
    return w - jnp.dot(jnp.dot(basis, w, precision=_HIGHEST), basis, precision=_HIGHEST)


def _reorthogonalize(basis: jax.Array, w: jax.Array) -> jax.Array:
    """``w`` made orthogonal to the rows of ``basis`` to working precision: a classical
    Gram-Schmidt pass, and a second one only when the first removed more than about
    30% of ``w``'s norm (the criterion of Daniel, Gragg, Kaufman and Stewart, 1976, used
    by ARPACK). Above that ratio one pass is already orthogonal to working precision;
    below it, "twice is enough". The second pass reads the whole basis again, and
    in Lanczos it is rarely needed, so skipping it halves the cost of most steps."""
    before = _norm(w)
    w = _gram_schmidt(basis, w)
    again = _norm(w) < _DGKS * before
    return jax.lax.cond(again, _gram_schmidt, lambda basis, w: w, basis, w)


# Daniel-Gragg-Kaufman-Stewart's threshold: repeat Gram-Schmidt when the norm shrank
# below ``1/sqrt(2)`` of what it was.
_DGKS = 0.7071067811865476


def lanczos_step(
    state: LanczosState,
    step: jax.Array,
    w: jax.Array,
    *,
    reorthogonalize: bool,
    tol: float,
) -> LanczosState:
    """Advance the recurrence by one step, given ``w = A v_step``.

    A pure function shared by the scanned and the host-driven drivers. Steps after a
    breakdown or a non-finite product leave the state unchanged.
    """
    basis = state.basis
    order = basis.shape[0]
    v = basis[step]
    prev = jnp.maximum(step - 1, 0)
    beta_prev = jnp.where(step > 0, state.betas[prev], 0).astype(w.dtype)

    finite_w = jnp.all(jnp.isfinite(w))
    w = jnp.where(finite_w, w, 0)
    w_norm = _norm(w)
    alpha = jnp.dot(v, w, precision=_HIGHEST)
    w = w - alpha * v - beta_prev * basis[prev]
    if reorthogonalize:
        w = _reorthogonalize(basis, w)
    beta = _norm(w)
    finite = finite_w & jnp.isfinite(alpha) & jnp.isfinite(beta)
    scale = jnp.maximum(state.scale, w_norm)
    broke = beta <= tol * scale

    active = ~state.stopped & finite
    grow = active & ~broke
    nxt = jnp.minimum(step + 1, order - 1)
    write = grow & (step + 1 < order)
    v_next = w / jnp.where(grow, beta, 1)
    basis = basis.at[nxt].set(jnp.where(write, v_next, basis[nxt]))
    alphas = state.alphas.at[step].set(jnp.where(active, alpha, state.alphas[step]))
    betas = state.betas.at[step].set(jnp.where(grow, beta, state.betas[step]))
    return LanczosState(
        basis=basis,
        alphas=alphas,
        betas=betas,
        num_steps=jnp.where(active, step + 1, state.num_steps).astype(jnp.int32),
        stopped=state.stopped | ~finite | broke,
        nonfinite_step=jnp.where(~state.stopped & ~finite, step, state.nonfinite_step).astype(
            jnp.int32
        ),
        scale=jnp.where(active, scale, state.scale),
    )


def pack_result(state: LanczosState) -> LanczosResult:
    """The result of a state: everything past the valid steps set to zero."""
    valid = jnp.arange(state.alphas.shape[0]) < state.num_steps
    return LanczosResult(
        alphas=jnp.where(valid, state.alphas, 0),
        betas=jnp.where(valid, state.betas, 0),
        basis=jnp.where(valid[:, None], state.basis, 0),
        num_steps=state.num_steps,
        nonfinite_step=state.nonfinite_step,
    )


# -- matvec plumbing ----------------------------------------------------------------------


def _is_operator(obj: Any) -> bool:
    return is_operator(obj)


def flat_matvec(
    fn: Callable | None, operand: Any, template: PyTree | None, products: tuple | None = None
) -> Callable:
    """The flat ``(dim,) -> (dim,)`` product.

    ``fn`` is a user function (a static part of the compiled program); ``operand`` is a
    pytree that carries its arrays as arguments: an operator, or a ``jax.tree_util.Partial``.
    ``products``: ``(dtype, x64_off)`` when the recurrence is wider than the products (see
    :func:`_mixed_precision`).
    """
    if _is_operator(operand):
        matvec = operand.matvec
    else:
        base = fn if operand is None else operand
        if template is None:
            matvec = base
        else:
            flat, unravel = ravel_pytree(template)

            def matvec(x):
                return ravel_pytree(base(unravel(x.astype(flat.dtype))))[0]

    checked = _shape_checked(matvec)
    return checked if products is None else _mixed_precision(checked, *products)


def _shape_checked(matvec: Callable) -> Callable:
    """``matvec`` that refuses (at trace time, so for free) to return another shape than
    its vector's: a wrong shape failed deep inside ``lax.cond``."""

    def product(v):
        w = matvec(v)
        if jnp.shape(w) != v.shape:
            raise ValueError(
                f"the matvec returned shape {jnp.shape(w)} for a vector of shape {v.shape}; "
                "it must map (dim,) to (dim,)."
            )
        return w

    return product


def _mixed_precision(matvec: Callable, dtype: Any, x64_off: bool) -> Callable:
    """``matvec`` on vectors of a wider recurrence: each vector is cast to the products'
    ``dtype`` and the product back to the recurrence's. ``x64_off``: the program enabled
    64-bit types only for the recurrence, so the product is traced (and run) with them off,
    exactly as it would be without the wider recurrence."""

    def product(v):
        wide = v.dtype
        with jax.enable_x64(False) if x64_off else contextlib.nullcontext():
            w = matvec(v.astype(dtype))
        return jnp.asarray(w).astype(wide)

    return product


def _trace_error(fn: Callable, template: PyTree | None, dim: int, dtype: Any) -> Exception | None:
    """Why ``fn`` cannot be traced on its vectors (``None`` if it can), found abstractly
    with ``jax.eval_shape`` (nothing runs on a device; JAX caches it per function). A
    function that reads data on the host, converts its argument to NumPy or branches on its
    values cannot be traced, and is driven from the host loop instead."""
    if template is None:
        vector = jax.ShapeDtypeStruct((dim,), dtype)
    else:
        vector = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), template
        )
    try:
        jax.eval_shape(fn, vector)
    except Exception as err:  # any failure: the host loop calls it eagerly, real errors show
        return err
    return None


def compiled_steps(product, step_fn, state, start, stop):
    """Steps ``start .. stop - 1`` as one compiled loop: ``step_fn(state, step,
    product(state, step))``; the loop shared by ``lanczos`` (one recurrence) and ``slq`` (a
    batch). With traced bounds (one program serves segments of any length) a ``while``
    loop that ends early once every recurrence in ``state`` has stopped (breakdown or a
    non-finite product); with Python-int bounds (a whole run under the caller's ``jit``) a
    ``lax.scan``, which reverse-mode differentiation can go through. The product is not
    wrapped in a ``lax.cond`` to skip it after a stop: that slowed every step
    (``benchmarks/bench_lanczos_core.py`` measures it)."""

    if isinstance(start, int) and isinstance(stop, int):
        # Static bounds (the whole run under the caller's jit): a scan, which reverse-mode
        # differentiation can go through; products after a stop run and are ignored.
        def scanned(state, step):
            return step_fn(state, step, product(state, step)), None

        return jax.lax.scan(scanned, state, jnp.arange(start, stop, dtype=jnp.int32))[0]

    def going(carry):
        step, state = carry
        return (step < stop) & ~jnp.all(state.stopped)

    def body(carry):
        step, state = carry
        return step + 1, step_fn(state, step, product(state, step))

    return jax.lax.while_loop(going, body, (jnp.asarray(start, jnp.int32), state))[1]


def _steps(matvec, state, start, stop, steps):
    """One recurrence's steps ``start .. stop - 1`` (:func:`compiled_steps`), with the
    settings ``steps`` (a :class:`Steps`)."""

    def product(state, step):
        v = state.basis[step]
        if steps.pad:  # the basis has zero columns past dim (see column_padding)
            w = matvec(v[: v.shape[0] - steps.pad]).astype(v.dtype)
            return jnp.pad(w, (0, steps.pad))
        return matvec(v).astype(v.dtype)

    def step_fn(state, step, w):
        state = lanczos_step(state, step, w, reorthogonalize=steps.reorthogonalize, tol=steps.tol)
        return _constrain(state, steps.basis_sharding)

    return compiled_steps(product, step_fn, state, start, stop)


@functools.partial(jax.jit, static_argnames=("fn", "order", "steps"))
def _scan_lanczos(fn, operand, template, v0, *, order, steps):
    """The whole recurrence as one program: for ``lanczos`` under the caller's ``jit``."""
    state = _constrain(init_state(v0, order), steps.basis_sharding)
    matvec = flat_matvec(fn, operand, template, steps.products)
    result = pack_result(_steps(matvec, state, 0, order, steps))
    return _constrain(result, steps.basis_sharding)  # the basis stays where it was


def _constrain(state, basis_sharding):
    """Keep the basis of a state or result laid out as ``basis_sharding`` (e.g. columns
    split over devices)."""
    if basis_sharding is None:
        return state
    return state._replace(basis=jax.lax.with_sharding_constraint(state.basis, basis_sharding))


@functools.partial(jax.jit, static_argnames=("fn", "steps"), donate_argnames=("state",))
def _scan_segment(fn, operand, template, state, start, stop, *, steps):
    """Steps ``start .. stop - 1`` (traced bounds: one compilation for every segment)."""
    matvec = flat_matvec(fn, operand, template, steps.products)
    return _steps(matvec, state, start, stop, steps)


_init_jit = jax.jit(init_state, static_argnums=1)
_step_jit = jax.jit(lanczos_step, static_argnames=("reorthogonalize", "tol"), donate_argnums=0)
_pack_jit = jax.jit(pack_result, donate_argnums=0)


def host_loop(product, step_fn, state, start, stop, *, bar, watch, describe=None):
    """Steps ``start .. stop - 1`` from the host (``lanczos``'s and ``slq``'s host loops):
    ``step_fn(state, step, product(state, step))``, ending early when every recurrence has
    stopped or after Ctrl-C (between steps; a second Ctrl-C abandons the product in
    progress). ``describe(state, step)`` adds to the bar. Returns ``(state, reached)``."""
    for step in range(start, stop):
        if watch.requested:
            return state, step
        try:
            w = product(state, step)
        except KeyboardInterrupt:  # the state is untouched: keep the finished steps
            watch.requested = True
            return state, step
        state = step_fn(state, step, w)
        stopped = bool(np.all(np.asarray(state.stopped)))
        info = describe(state, step) if describe is not None and bar.enabled else {}
        bar.update_to(bar.total if stopped else step + 1, **info)
        if stopped:
            return state, step + 1
    return state, stop


def _host_steps(matvec, state, start, stop, *, steps, bar, watch):
    """One recurrence's steps from the host, with the latest alpha and beta on the bar."""

    def product(state, step):
        return jnp.asarray(matvec(state.basis[step]), state.basis.dtype)

    def step_fn(state, step, w):
        return _step_jit(state, step, w, reorthogonalize=steps.reorthogonalize, tol=steps.tol)

    def describe(state, step):
        alpha, beta = float(state.alphas[step]), float(state.betas[step])
        return {"alpha": f"{alpha:.4g}", "beta": f"{beta:.4g}"}

    return host_loop(product, step_fn, state, start, stop, bar=bar, watch=watch, describe=describe)


# A scanned run is cut into segments of about this many seconds (measured as it runs): the
# run then stops within about a segment, or one step when a step takes longer, after Ctrl-C.
# Each segment is one XLA execution, which maps fresh memory for its temporaries: on the
# CIFAR CNN (1.2-1.4 s steps) about 48,000 page faults, 0.2 s of system time, a step when
# every segment was one step (0.5 s); with 3 s, two steps share them. Measured, order 12,
# alternating runs in one process: 16.9 s with 0.5 s, 16.3 s with 3 s, 15.8 s as one segment.
SEGMENT_SECONDS = 3.0


def run_steps(
    advance,
    state,
    order,
    *,
    bar,
    synced,
    checkpointer=None,
    every=10,
    resume=False,
    collective=False,
):
    """Drive a recurrence to ``order`` steps: the one loop behind ``lanczos`` and ``slq``.

    ``advance(state, start, stop, watch) -> (state, reached)`` runs steps ``start ..
    stop - 1``: a compiled segment (``synced=False``), whose length the driver sets from
    the measured time per step, or the host loop (``synced=True``), which checks
    ``watch.requested`` between its steps. With a ``checkpointer`` the state is saved every
    ``every`` steps, at the end and after Ctrl-C, and a saved run continues when ``resume``.
    Returns ``(state, interrupted)``; after Ctrl-C the state holds the finished steps.

    ``collective``: the operator spans several processes, which must run the same
    segments (their collectives pair up in order): every segment's length is process 0's,
    a stop asked on any process stops all of them at the same step, and the host loop
    advances one step per segment.
    """
    if checkpointer is not None:
        every = count("checkpoint_every", every)
    start, done, length = 0, False, 1
    with interrupt.watch() as watch:
        inner = _NoStop() if collective else watch  # decisions between segments only
        try:
            if checkpointer is not None:
                checkpointer.lock()  # one run per folder, until close()
                if collective:
                    loaded = _resume_together(checkpointer, state, resume)
                    if loaded is not None:
                        state = jax.tree_util.tree_map(_put_like, loaded[0], state)
                        start, done = loaded[1:]
                        bar.update_to(order if done else start)
                elif checkpointer.exists():
                    if not resume:
                        raise FileExistsError(
                            f"{checkpointer.folder} already holds a checkpoint; pass "
                            "resume=True to continue that run, or give an empty folder."
                        )
                    loaded, start, done = checkpointer.load(state)
                    # where the fresh state was: host memory for basis_memory="host"
                    state = jax.tree_util.tree_map(_put_like, loaded, state)
                    bar.update_to(order if done else start)
            while not done:
                if collective:
                    length, watch.requested = _agree(length, watch.requested)
                if watch.requested:
                    break
                stop = order if synced and not collective else min(start + length, order)
                if checkpointer is not None:
                    stop = min(stop, (start // every + 1) * every)
                began = time.perf_counter()
                state, reached = advance(state, start, stop, inner)
                stopped = bool(np.all(np.asarray(state.stopped)))  # waits for the segment
                if not synced:  # the next segment: at most twice as long, about SEGMENT_SECONDS
                    per_step = (time.perf_counter() - began) / max(reached - start, 1)
                    fits = int(SEGMENT_SECONDS / max(per_step, 1e-9))
                    length = max(1, min(2 * length, fits))
                done = reached == order or stopped
                bar.update_to(order if done else reached)
                if checkpointer is not None and (done or reached % every == 0 or watch.requested):
                    # A host loop is busy in Python between its dispatches: a writer thread
                    # would compete with it for the interpreter (measured: twice the cost),
                    # so it writes in line; a scanned run's writes overlap its next segment.
                    # A collective run writes in line too: its processes then finish each
                    # save before the next segment, so a kill finds them at most one apart.
                    checkpointer.save(state, reached, done, background=not (synced or collective))
                start = reached
        finally:
            if checkpointer is not None:
                checkpointer.close()  # the last write completes (or raises) before returning
    return state, watch.requested and not done


def _put_like(new: Any, old: Any) -> Any:
    """``new`` on the devices of ``old`` (a checkpoint is read onto the default device)."""
    sharding = getattr(old, "sharding", None)
    if sharding is None or getattr(new, "sharding", None) == sharding:
        return new
    if not sharding.is_fully_addressable:  # several processes: each provides its shards
        return global_array(new, sharding)
    return jax.device_put(new, sharding)


def _resume_together(checkpointer, state, resume):
    """A collective run's start: every process resumes from the same step, the latest
    that all of their checkpoints hold (each keeps its last two states, and a kill can
    catch their writes one save apart), or all start afresh when one has none. Returns
    ``(state, next_step, done)`` or ``None``; raises on every process alike."""
    saved = checkpointer.saved_steps()
    latest = saved[0][0] if saved else -1
    everyone = gather(latest)[:, 0]
    if np.any(everyone >= 0) and not resume:
        raise FileExistsError(
            f"{checkpointer.folder.parent} already holds a checkpoint of processes "
            f"{np.flatnonzero(everyone >= 0).tolist()}; pass resume=True to continue that "
            "run, or give an empty folder."
        )
    if not resume or np.any(everyone < 0):
        return None
    target = int(everyone.min())
    files = dict(reversed(saved))  # the last state written wins over an equal previous one
    agreed = all_ok(target in files)
    if not np.all(agreed):
        raise ValueError(
            f"the processes' checkpoints in {checkpointer.folder.parent} end at steps "
            f"{everyone.tolist()}, and process(es) {np.flatnonzero(~agreed).tolist()} "
            f"no longer hold step {target}; they cannot resume together. Start afresh in "
            "another folder."
        )
    loaded, error = None, None
    try:
        loaded = checkpointer.load(state, files[target])
    except Exception as err:  # corrupt, or written for other data: raise on every process
        error = err
    failed = ~all_ok(error is None)
    if error is not None:
        raise error
    if np.any(failed):
        raise ValueError(
            f"process(es) {np.flatnonzero(failed).tolist()} could not read their checkpoint "
            f"in {checkpointer.folder.parent} (their error says why); no process resumes."
        )
    return loaded


class _NoStop:
    """What a collective run's segments see in place of the Ctrl-C watch: no stop inside
    a segment (the processes decide together between segments)."""

    requested = False


def _agree(length: int, requested: bool) -> tuple[int, bool]:
    """Process 0's segment length, and whether any process was asked to stop: the same
    on every process of a collective run."""
    everyone = gather([length, int(requested)])
    return int(everyone[0, 0]), bool(everyone[:, 1].any())


def interrupted(what: str, steps: int, order: int, result: Any, checkpoint: Any) -> Interrupted:
    """The exception for a run stopped by Ctrl-C after ``steps`` of ``order`` steps."""
    where = f"; the checkpoint in {checkpoint} continues it (resume=True)" if checkpoint else ""
    return Interrupted(
        f"{what} stopped by Ctrl-C after {steps} of {order} steps{where}; the finished "
        "steps are in this exception's 'result' attribute.",
        result=result,
        steps=steps,
        total=order,
    )


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def default_tol(dtype) -> float:
    return float(50 * jnp.finfo(dtype).eps)


def lanczos(
    matvec: Callable | Any,
    key: jax.Array | None,
    order: int,
    *,
    dim: int | None = None,
    v0: jax.Array | PyTree | None = None,
    like: PyTree | None = None,
    reorthogonalize: bool = True,
    loop: str | None = None,
    breakdown_tol: float | None = None,
    progress: ProgressArg = False,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
    basis_sharding: jax.sharding.Sharding | None = None,
    basis_memory: str = "device",
    recurrence_dtype: Any = None,
) -> LanczosResult:
    """Run ``order`` steps of Lanczos on a symmetric operator.

    Parameters
    ----------
    matvec:
        The operator: a function ``v -> A v`` on flat ``(dim,)`` vectors, a function on
        params-shaped pytrees (give ``like=params`` or a pytree ``v0``), or an operator such
        as :func:`jax_spectral.hessian_operator`'s (``dim`` and ``dtype`` come from it; its
        bound ``matvec``/``matvec_tree`` are recognised as the operator). A plain function is
        a static part of the compiled program: arrays it closes over are compiled in as
        constants, and a new function object compiles anew. Pass the operator itself, or
        wrap the function as ``jax.tree_util.Partial(f, *arrays)`` so that its arrays are
        arguments. A plain function that cannot be traced (one that reads its data on the
        host, as the original package's ``get_hvp_fn`` products do) is detected by tracing
        it once abstractly and is driven from the host loop.
    key:
        PRNG key for the start vector (standard normal, normalised). May be ``None`` when
        ``v0`` is given.
    order:
        Number of steps ``m`` (fewer run after a breakdown).
    dim:
        Length of the flat vectors, for a flat ``matvec`` without ``v0``.
    v0:
        Explicit start vector (flat or params-shaped); normalised here.
    like:
        A params-shaped template: ``matvec`` then acts on pytrees and is flattened once
        with ``ravel_pytree``; ``dim`` and dtype come from the template.
    reorthogonalize:
        Full reorthogonalisation (classical Gram-Schmidt, a second pass when the first removed
        most of the vector).
    loop:
        ``"scan"``: the recurrence runs as compiled loops inside ``jit`` (compiles once per
        shape; works under ``jit`` and ``vmap`` over keys, where it is one ``lax.scan``,
        which ``jax.grad`` can differentiate).
        Called eagerly, it runs in segments of about three seconds each (timed as it
        runs: one step per segment when a step takes longer), so that Ctrl-C stops it
        within a segment. ``"host"``: a Python loop
        calling the same jitted step function, for operators that cannot be traced
        (streamed data) or run slowly inside a compiled loop. ``None`` picks ``"host"`` for
        an operator with ``traceable == False`` or a plain function that cannot be
        traced, and ``"scan"`` otherwise.
    breakdown_tol:
        Breakdown when ``beta_i <= breakdown_tol * max_j |A v_j|``; default ``50 * eps`` of
        the products' dtype (the accuracy of ``A v``, whatever the recurrence's dtype).
    progress:
        ``True`` shows a progress bar (steps, time per step, ETA; the host loop also shows
        the latest ``alpha`` and ``beta``) on stderr; a callable is called as
        ``progress(steps_done, order, elapsed_seconds)``; ``False`` is silent. The host loop
        reports every step, the scanned loop every segment (see below); under the caller's
        own ``jit``/``vmap`` progress is off.
    checkpoint, checkpoint_every, resume:
        With ``checkpoint`` a folder, the state is saved there every ``checkpoint_every``
        steps, and after Ctrl-C (see :mod:`jax_spectral.checkpoint`: atomic writes, only new
        basis rows each time). ``resume=True``
        continues the run saved there (or starts one if the folder has none) and gives the
        same tridiagonal, bit for bit, as an uninterrupted checkpointed run; a checkpoint
        of other settings, another operator, other data or another start vector is refused
        with ``ValueError``. Without ``resume`` a folder that already holds a checkpoint is
        refused (``FileExistsError``). Not under ``jit``/``vmap``.
    basis_sharding:
        Scanned loop: the layout of the ``(order, dim)`` basis across devices, for example
        ``NamedSharding(mesh, PartitionSpec(None, "data"))`` to split its columns, so that
        each device holds ``order * dim / n`` entries (``dim`` rounded up to a multiple of
        ``n`` with zero columns when ``n`` does not divide it: see :class:`LanczosResult`);
        the reorthogonalisation products then run sharded with a reduction across devices.
        Checkpoints work with it on one process (not yet with a basis split over several
        processes).
    basis_memory:
        ``"device"``, or ``"host"`` to keep the ``(order, dim)`` basis and the recurrence
        in host memory, on JAX's CPU device, while the products run on the default device
        (one vector travels each way per step): for bases that do not fit the
        accelerator. It runs from the host loop, with the same results.
    recurrence_dtype:
        The dtype of the recurrence (alphas, betas, basis, reorthogonalisation). Default:
        the operator's dtype promoted to at least float32, which is also the products'
        dtype. ``"float64"`` (or ``jnp.float64``) on a float32 operator runs the
        recurrence in float64 on float32 products, as the original package's TensorFlow
        code did: each vector is rounded to float32 for the product and the product
        widened again. Without ``jax_enable_x64`` it is enabled for the recurrence only
        (the products are traced and run with it off, so the model computes exactly as
        it would otherwise), and the result's arrays come back as NumPy float64 arrays
        (JAX would truncate float64 arrays outside x64). The basis takes twice the memory
        (see :func:`jax_spectral.estimate`). Not under the caller's ``jit``/``vmap`` unless
        x64 is on.

    Returns
    -------
    LanczosResult
        ``alphas`` and ``betas`` (order,), ``basis`` (order, dim), ``num_steps`` and
        ``nonfinite_step``; ``tridiag`` is the valid block ``T[:k, :k]`` (``k =
        num_steps``), ``padded_tridiag()`` the ``(order, order)`` matrix.

    Raises
    ------
    MemoryError
        The ``(order, dim)`` basis cannot fit in the memory of one device (see
        :func:`jax_spectral.estimate`); the message says what would.
    ValueError
        ``order <= 0``; no way to know ``dim`` (or a non-positive ``dim``); a start vector of
        the wrong length, zero or non-finite;
        ``loop="scan"`` on a host-only operator or ``loop="host"`` under ``jit``/``vmap``;
        unknown ``loop``.
    TypeError
        ``order`` is not an int; ``matvec`` is neither callable nor an operator.
    NonFiniteError
        A product was NaN or Inf (outside ``jit``/``vmap``; a ``FloatingPointError``); the
        message names the step, and the exception's ``step`` and ``result`` attributes
        hold it and the result whose steps before it are valid.
    jax_spectral.Interrupted
        Ctrl-C (a ``KeyboardInterrupt``): the run stopped at the end of the step or
        segment in progress (a second Ctrl-C abandons a host loop's product in progress);
        ``result`` holds the finished steps, and a checkpoint folder has them saved.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> A = jnp.diag(jnp.arange(1.0, 6.0))
    >>> res = lanczos(lambda v: A @ v, jax.random.key(0), 5, dim=5)
    >>> np.round(np.linalg.eigvalsh(np.asarray(res.tridiag)), 4)
    array([1., 2., 3., 4., 5.], dtype=float32)
    """
    order = count("order", order)
    problem = resolve(matvec, dim=dim, v0=v0, like=like)
    precision = _Precision.of(recurrence_dtype, problem.dtype)
    v0 = _start_vector(problem, key)
    placement = Placement.of(basis_sharding, basis_memory)
    loop, untraceable = _choose_loop(loop, problem, placement)
    tol = default_tol(problem.dtype) if breakdown_tol is None else float(breakdown_tol)
    pad = column_padding(basis_sharding, problem.dim)
    steps = Steps(reorthogonalize, tol, precision.products, basis_sharding, pad)
    traced = _is_tracer(v0) or any(map(_is_tracer, jax.tree_util.tree_leaves(problem.args)))
    if traced:
        _check_traceable_run(untraceable, loop, checkpoint, precision)
    cost = _check_placement(problem, order, precision.wide, placement, loop, checkpoint, traced)
    checkpointer = None
    if checkpoint is not None:
        checkpointer = _checkpointer(checkpoint, problem, v0, order, precision, steps, loop)
    if cost is not None:  # a curvature operator's batches linearised once for all steps
        from .costs import prepared

        operand = prepared(problem.args[0], cost, placement.on_host)
        problem = problem._replace(args=(operand, *problem.args[1:]))
    if precision.x64_off:  # the operand's arrays made now, not as float64 in the x64 context
        problem = problem._replace(args=jax.tree_util.tree_map(jnp.asarray, problem.args))
    with Progress(progress if not traced else False, order, "lanczos") as bar, precision.scope():
        v0 = jnp.pad(v0.astype(precision.wide), (0, pad))  # padding: zero entries, kept zero
        if traced:  # under the caller's jit/vmap: the whole recurrence as one program
            result = _scan_lanczos(problem.fn, *problem.args, v0, order=order, steps=steps)
            stopped_early = False
        else:
            run = _Run(loop, placement.on_host, checkpointer, checkpoint_every, resume)
            result, stopped_early = _drive(problem, v0, order, steps, run, bar=bar)
        if precision.x64_off:  # float64 JAX arrays would be truncated outside x64: NumPy
            result = LanczosResult(*(np.asarray(field) for field in result))
    if stopped_early:
        raise interrupted("lanczos", int(result.num_steps), order, result, checkpoint)
    if not _is_tracer(result.num_steps):
        warn_if_zero(result)
        check_finite(result, "Lanczos")
    return result


class Problem(NamedTuple):
    """What ``lanczos`` runs on: ``fn`` a static function, or ``args = (operand,
    template)`` pytree arguments (an operator, or a ``Partial``; ``template``: the params
    layout of a function on pytrees); the vector length, the products' dtype (at least
    float32) and the flat start vector, if one was given."""

    fn: Callable | None
    args: tuple[Any, PyTree | None]
    dim: int
    dtype: np.dtype
    v0: Any


def resolve(matvec: Any, *, dim: Any = None, v0: Any = None, like: PyTree | None = None) -> Problem:
    """What ``lanczos``, ``eigenpairs`` and the trace estimators run on: recognise
    ``matvec`` (an operator, a bound method of one, a ``Partial`` of arrays or a plain
    function) and find the vector length and dtype."""
    operand, fn = None, None
    owner = getattr(matvec, "__self__", None)
    if _is_operator(matvec):
        operand = as_argument(matvec)
    elif isinstance(matvec, jax.tree_util.Partial) and passes_as_argument(matvec):
        operand = matvec
    elif _is_operator(owner) and getattr(matvec, "__name__", "") in _OPERATOR_METHODS:
        operand = as_argument(owner)  # matvec_tree is unravel . matvec . ravel: the same
    elif callable(matvec):
        fn = matvec
    else:
        raise TypeError(f"matvec must be callable or an operator, got {type(matvec)}.")
    if _is_operator(operand):
        check_operator(operand)
        if v0 is not None and not _is_array_vector(v0):
            v0 = operand.ravel(v0)
        return Problem(None, (operand, None), operand.dim, _products_dtype(dtype_of(operand)), v0)
    if like is None and v0 is not None and not _is_array_vector(v0):
        like = v0  # a params-shaped (or any non-flat) start vector is the template
    if like is not None:
        flat_like = ravel_pytree(like)[0]
        if v0 is not None and not _is_array_vector(v0):
            from .hvp import check_like

            check_like(like, v0, "v0")
            v0 = ravel_pytree(v0)[0]
        size = count("the template's size", flat_like.shape[0])
        return Problem(fn, (operand, like), size, _products_dtype(flat_like.dtype), v0)
    if v0 is not None and dim is None:
        dim = v0.shape[0]
    if dim is None:
        raise ValueError(
            "cannot tell the vector length of a matvec function: give dim=, a start vector v0=, "
            "or like=params for a matvec on params-shaped pytrees."
        )
    dtype = v0.dtype if v0 is not None else jnp.zeros(()).dtype
    return Problem(fn, (operand, None), count("dim", dim), _products_dtype(dtype), v0)


def _products_dtype(dtype: Any) -> np.dtype:
    """The products' dtype: at least float32 (float64 only under x64, as JAX computes)."""
    return np.dtype(jnp.promote_types(jax.dtypes.canonicalize_dtype(dtype), jnp.float32))


class _Precision(NamedTuple):
    """The recurrence's dtype ``wide``; ``x64_off``: 64-bit types are enabled for the
    recurrence only; ``products``: ``(dtype, x64_off)`` when the recurrence is wider than
    the products (see :func:`_mixed_precision`), else ``None``."""

    wide: np.dtype
    x64_off: bool
    products: tuple | None

    @classmethod
    def of(cls, requested: Any, dtype: np.dtype) -> _Precision:
        wide = _recurrence_dtype(requested, dtype)
        x64_off = wide == np.float64 and not jax.config.jax_enable_x64
        return cls(wide, x64_off, None if wide == dtype else (np.dtype(dtype), x64_off))

    def scope(self):
        return jax.enable_x64(True) if self.x64_off else contextlib.nullcontext()


class Steps(NamedTuple):
    """The recurrence's settings, static in every compiled program."""

    reorthogonalize: bool
    tol: float
    products: tuple | None
    basis_sharding: Any
    pad: int = 0  # zero columns after the dim entries, so that basis_sharding divides them


def _start_vector(problem: Problem, key: Any) -> jax.Array:
    """The given start vector, or a standard normal one from ``key``; checked."""
    v0, dim = problem.v0, problem.dim
    if v0 is None:
        if key is None:
            raise ValueError("lanczos needs a PRNG key for its start vector, or an explicit v0.")
        v0 = jax.random.normal(key, (dim,), problem.dtype)
    v0 = jnp.asarray(v0, problem.dtype)  # widened for the recurrence later: the same vector
    if v0.shape != (dim,):
        raise ValueError(f"the start vector has shape {v0.shape}, expected ({dim},).")
    if not _is_tracer(v0):
        norm = float(np.linalg.norm(np.asarray(v0, np.float64)))  # host: also under a jit
        if not (np.isfinite(norm) and norm > 0):
            raise ValueError(f"the start vector must be finite and non-zero; its norm is {norm}.")
    return v0


class Placement(NamedTuple):
    """Where the basis lives: ``sharding`` (``basis_sharding``) across devices, or
    ``on_host`` (``basis_memory="host"``) in host memory; shared by lanczos and slq."""

    sharding: Any
    on_host: bool

    @classmethod
    def of(cls, basis_sharding: Any, basis_memory: str) -> Placement:
        if basis_memory not in ("device", "host"):
            raise ValueError(f"basis_memory must be 'device' or 'host', got {basis_memory!r}.")
        if basis_memory == "host" and basis_sharding is not None:
            raise ValueError(
                "basis_memory='host' keeps the basis on the host's CPU device, which cannot "
                "be combined with basis_sharding=; choose one."
            )
        return cls(basis_sharding, basis_memory == "host")


class _Run(NamedTuple):
    """How an eager run is driven: its loop, the basis in host memory, checkpoints."""

    loop: str
    on_host: bool
    checkpointer: Any
    every: int
    resume: bool


def _choose_loop(
    loop: str | None, problem: Problem, placement: Placement
) -> tuple[str, Exception | None]:
    """``(loop, untraceable)``: the loop to run (``None`` chooses), and why a plain
    function cannot be traced (``None`` if it can or was not tried)."""
    if loop not in (None, "scan", "host"):
        raise ValueError(f"loop must be 'scan', 'host' or None, got {loop!r}.")
    if placement.on_host:
        if loop == "scan":
            raise ValueError("basis_memory='host' runs from the host loop; use loop='host'.")
        return "host", None
    traceable, untraceable = is_traceable(problem.args[0]), None
    if problem.fn is not None and loop is None:
        untraceable = _trace_error(problem.fn, problem.args[1], problem.dim, problem.dtype)
        traceable = untraceable is None
    if loop is None:
        loop = "scan" if traceable else "host"
    if loop == "scan" and not traceable:
        raise ValueError(
            "this operator reads its data from the host and cannot run inside lax.scan; "
            "use loop='host' (the default for it)."
        )
    return loop, untraceable


def _check_traceable_run(untraceable, loop, checkpoint, precision) -> None:
    """Refuse what cannot run under the caller's ``jit``/``vmap``."""
    if untraceable is not None:
        raise ValueError(
            "lanczos is being traced (jit or vmap) but its matvec cannot be traced, so it "
            "could only run from a host loop (a function that reads data on the host "
            "must be called outside jit); tracing it failed with "
            f"{type(untraceable).__name__}: {_first_line(untraceable)}"
        ) from untraceable
    if loop == "host" or checkpoint is not None:
        raise ValueError(
            "host-driven or checkpointed Lanczos cannot run under jit or vmap; use a "
            "traceable operator with loop='scan', or call lanczos outside the "
            "transformation."
        )
    if precision.x64_off:
        raise ValueError(
            "a float64 recurrence under jit or vmap needs jax_enable_x64 for the whole "
            "program; call lanczos outside the transformation instead."
        )


def _check_placement(problem, order, wide, placement, loop, checkpoint, traced):
    """Refuse a basis that cannot fit (before allocating it) or cannot be sharded; the
    run's cost estimate (``None`` under the caller's transformations)."""
    basis_sharding, on_host = placement
    cost = None
    if not traced:
        from ._processes import smallest
        from .costs import check_fits, estimate

        cost = estimate(
            problem.dim, order=order, dtype=wide, basis_sharding=basis_sharding, on_host=on_host
        )
        if operand_mesh(problem.args) is not None:  # several processes decide alike
            cost = cost._replace(free_bytes=smallest(cost.free_bytes))
        check_fits(cost, on_host=on_host)
    if basis_sharding is not None:
        if loop == "host":
            raise ValueError("basis_sharding= applies to the scanned loop.")
        if checkpoint is not None:  # rows whole: each process saves its columns
            from .checkpoint import local_columns

            local_columns(
                basis_sharding, (order, problem.dim + column_padding(basis_sharding, problem.dim))
            )
        from .operators import check_auto_mesh

        check_auto_mesh(basis_sharding.mesh)
    return cost


def _checkpointer(folder, problem, v0, order, precision, steps, loop):
    """The run's checkpoint folder, with the settings and identities it must match."""
    operand = problem.args[0]
    operator = operand if operand is not None else problem.fn
    settings = {
        "kind": "lanczos",
        "order": order,
        "dim": problem.dim,
        "dtype": str(precision.wide),
        "loop": loop,
    }
    if steps.pad:  # the basis's columns depend on the number of devices
        settings[_PADDED] = problem.dim + steps.pad
    return checkpointer_for(folder, settings, steps, operator, v0, rows_axis=0)


def checkpointer_for(folder, settings, steps, operator, starts, *, rows_axis):
    """A checkpoint folder for a run of ``lanczos`` or ``slq``: resuming needs the same
    ``settings`` and recurrence settings, the same operator and data and the same start
    vectors (compared by fingerprint); the basis rows are along ``rows_axis``."""
    from .checkpoint import Checkpointer, fingerprint

    settings = {**settings, "reorthogonalize": steps.reorthogonalize, "tol": steps.tol}
    identity = {"operator and data": fingerprint(operator), "start vector": fingerprint(starts)}
    several = operand_mesh(operator) is not None
    if several:  # several processes: each its own copy
        folder = os.path.join(folder, f"process-{jax.process_index()}-of-{jax.process_count()}")
    return Checkpointer(
        folder, settings=settings, identity=identity, rows_axis=rows_axis, keep_previous=several
    )


def _drive(problem, v0, order, steps, run, *, bar):
    """An eager run under the shared driver (:func:`run_steps`): compiled segments or the
    host loop (``run`` says which, and where the basis lives). Returns ``(result,
    stopped_by_ctrl_c)``."""
    if run.loop == "host":
        flat = flat_matvec(problem.fn, *problem.args, steps.products)
        if run.on_host:  # the state on the host's CPU device, the products where they were
            v0, flat = _products_elsewhere(v0, flat)

        def advance(state, start, stop, watch):
            return _host_steps(flat, state, start, stop, steps=steps, bar=bar, watch=watch)
    else:

        def advance(state, start, stop, watch):
            state = _scan_segment(
                problem.fn, *problem.args, state, jnp.int32(start), jnp.int32(stop), steps=steps
            )
            return state, stop

    mesh = operand_mesh(problem.args)
    if mesh is not None:  # a start vector on the host: on every device of the operator's
        v0 = replicated(mesh, v0)
    state = _place(_init_jit(v0, order), steps.basis_sharding)
    state, stopped_early = run_steps(
        advance,
        state,
        order,
        bar=bar,
        synced=run.loop == "host",
        checkpointer=run.checkpointer,
        every=run.every,
        resume=run.resume,
        collective=mesh is not None,
    )
    result = _pack_jit(state)
    if steps.basis_sharding is not None:
        result = result._replace(basis=jax.device_put(result.basis, steps.basis_sharding))
    return result, stopped_early


def _products_elsewhere(v0: jax.Array, matvec: Callable) -> tuple[jax.Array, Callable]:
    """``v0`` on the host's CPU device, and ``matvec`` for vectors there that runs on the
    default device (for ``basis_memory="host"``)."""
    host, compute = jax.local_devices(backend="cpu")[0], jax.local_devices()[0]

    def product(v):
        return jax.device_put(matvec(jax.device_put(v, compute)), host)

    return jax.device_put(v0, host), product


def replicated(mesh: Any, x: Any, what: str = "start vector") -> jax.Array:
    """``x`` replicated over ``mesh``; ``ValueError`` on every process unless every
    process passed the same ``x`` (a start vector from another key or ``v0`` would
    otherwise make one "replicated" array that differs between processes)."""
    import hashlib

    x = np.ascontiguousarray(np.asarray(x))
    digest = hashlib.sha256(f"{x.dtype}{x.shape}".encode() + x.tobytes()).digest()
    everyone = gather(np.frombuffer(digest[:8], np.int64))[:, 0]
    if np.any(everyone != everyone[0]):
        raise ValueError(
            f"the processes passed different {what}s (keys or v0); every process of a "
            "run over several processes passes the same ones."
        )
    return replicate(mesh, x)


def _place(state: LanczosState, basis_sharding: Any) -> LanczosState:
    """The state where the compiled segments leave it: the basis as ``basis_sharding``
    says, every other field replicated over its mesh."""
    if basis_sharding is None:
        return state
    replicated = jax.sharding.NamedSharding(basis_sharding.mesh, jax.sharding.PartitionSpec())
    others = dict.fromkeys(state._fields[1:], replicated)
    return jax.device_put(state, state._replace(basis=basis_sharding, **others))


class NonFiniteError(FloatingPointError):
    """A matrix-vector product contained NaN or Inf.

    Raised by every algorithm (``lanczos``, ``slq``, ``eigenpairs``, ``hutchinson``,
    ``hutchpp``) outside ``jit``/``vmap``. ``step`` is the first Lanczos step (0-based)
    whose product was non-finite, and ``result`` the run's result, whose steps before
    ``step`` are valid (both ``None`` where there is no recurrence, as in trace
    estimates). A ``FloatingPointError``, as before it had a type of its own.
    """

    def __init__(self, message: str, result: Any = None, step: int | None = None):
        super().__init__(message)
        self.result = result
        self.step = step


def check_finite(result: LanczosResult, what: str) -> None:
    """Raise :class:`NonFiniteError` if any recurrence in ``result`` met a non-finite
    product, naming the first such step."""
    bad = np.asarray(result.nonfinite_step)
    if not np.any(bad >= 0):
        return
    step = int(bad[bad >= 0].min())
    raise NonFiniteError(
        f"{what} step {step} (0-based): a matrix-vector product contained NaN or Inf (for "
        "a curvature operator: the loss or its product was non-finite). The steps before it "
        "are valid and kept in this exception's 'result' attribute. Check the loss for "
        "overflow or log(0), the data for NaN, or use float64.",
        result=result,
        step=step,
    )


_OPERATOR_METHODS = ("matvec", "__call__", "matvec_tree")


def warn_if_zero(result: LanczosResult) -> None:
    """Warn when every product was exactly zero (every run, for a batch of runs): the
    recurrence stopped at its first step with a zero tridiagonal, so the spectrum is one
    node at zero, whatever the operator's true scale was."""
    steps = np.asarray(result.num_steps)
    first = np.asarray(result.alphas)[..., 0]
    residual = np.asarray(result.residual_norm)
    if np.all(steps == 1) and np.all(first == 0) and np.all(residual == 0):
        warnings.warn(
            "every matrix-vector product was exactly zero, so the spectrum seen from the start "
            "vector(s) is a single node at 0. Either the start vector lies in the operator's "
            "null space, or the operator is zero: if it should not be, its entries "
            "underflowed (a loss scaled by a tiny factor, or float16/bfloat16 arithmetic); "
            "rescale the loss, or use float32 or float64 parameters.",
            RuntimeWarning,
            stacklevel=_caller_level(),
        )


def warn_if_broke_down(result: LanczosResult, order: int, padded: str) -> None:
    """Warn when the recurrence stopped before ``order`` steps, for the functions whose
    outputs have no ``num_steps`` (the original package's); ``padded`` says what is zero
    past the valid block."""
    if _is_tracer(result.num_steps) or int(result.num_steps) >= order:
        return
    warnings.warn(
        f"Lanczos broke down after {int(result.num_steps)} of {order} steps (the Krylov space "
        "is invariant: order exceeds the dimension or the number of distinct eigenvalues); "
        f"{padded}.",
        RuntimeWarning,
        stacklevel=_caller_level(),
    )


def _caller_level() -> int:
    """The ``stacklevel`` that attributes a warning to the first frame outside this
    package and the Keras bridge (the user's call of lanczos, slq, eigenpairs or
    approximate_hessian)."""
    here = os.path.dirname(os.path.abspath(__file__))
    ours = (here + os.sep, os.path.join(os.path.dirname(here), "keras_bridge") + os.sep)
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(ours):
        frame, level = frame.f_back, level + 1
    return level


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "(no message)"


def _recurrence_dtype(requested: Any, products: Any) -> np.dtype:
    """The recurrence's dtype: ``products`` (the products' dtype) unless a wider one is
    requested (float32 or float64)."""
    if requested is None:
        return np.dtype(products)
    try:
        wide = np.dtype(requested)
    except TypeError:
        raise TypeError(f"recurrence_dtype must be a dtype, got {requested!r}.") from None
    if wide not in (np.float32, np.float64) or wide.itemsize < np.dtype(products).itemsize:
        raise ValueError(
            f"recurrence_dtype must be float32 or float64 and at least as wide as the "
            f"products ({np.dtype(products).name}), got {wide.name}."
        )
    return wide


def _is_array_vector(x: Any) -> bool:
    return isinstance(x, (np.ndarray, jax.Array)) and np.ndim(x) == 1


# The checkpoint setting that records a padded basis's width: resuming needs the same.
_PADDED = "basis width (dim padded to divide basis_sharding's devices)"


def column_padding(basis_sharding: Any, dim: int) -> int:
    """How many zero columns make ``dim`` divisible by the number of pieces
    ``basis_sharding`` cuts the basis's columns into (0 without a sharding)."""
    spec = getattr(basis_sharding, "spec", None)
    if spec is None or len(spec) < 2 or spec[1] is None:
        return 0
    axes = spec[1] if isinstance(spec[1], tuple) else (spec[1],)
    sizes = basis_sharding.mesh.shape
    pieces = int(np.prod([sizes[a] for a in axes if isinstance(a, str) and a in sizes]))
    return -int(dim) % pieces


def _padded_to(basis: Any, size: int) -> bool:
    """Whether ``basis`` is a padded one (``basis_sharding`` on a ``dim`` it does not
    divide) of ``size`` true columns: a few more columns, all zero."""
    extra = basis.shape[-1] - size
    if extra <= 0 or extra >= basis.shape[-1]:
        return False
    return not bool(jnp.any(basis[..., size:] != 0))


def ritz(
    result: LanczosResult, *, like: PyTree | None = None, unravel: Callable | None = None
) -> tuple[np.ndarray, jax.Array | PyTree]:
    """Ritz values and vectors from one Lanczos run.

    Following the package's convention (small results on the host in float64, vectors
    where the basis is), returns the ``k = num_steps`` eigenvalues of the valid block
    ``T[:k, :k]`` as a NumPy float64 array (ascending, computed on the host), and the
    Ritz vectors ``S^T V[:k]`` as an array of the basis's kind: a ``(k, dim)`` JAX array
    (``dim`` padded as the basis is after ``basis_sharding``; see :class:`LanczosResult`)
    (NumPy float64 after a float64 recurrence without x64, which JAX would truncate), or
    with ``like`` (a params template, checked against the basis's length) or ``unravel``
    a params-shaped pytree of JAX arrays whose leaves have a leading axis of length ``k``.
    The valid steps of a run stopped by a non-finite product (``NonFiniteError.result``)
    give the Ritz pairs of those steps.
    """
    if np.ndim(result.num_steps) > 0:
        raise ValueError(
            "ritz takes one run, but this result holds a batch of runs (a leading axis of "
            f"{np.shape(result.num_steps)[0]}); pick one: "
            "jax.tree_util.tree_map(lambda x: x[i], result)."
        )
    if like is not None:
        flat = ravel_pytree(like)[0]
        size = flat.shape[0]
        if size != result.basis.shape[-1] and not _padded_to(result.basis, size):
            raise ValueError(
                f"like= has {size} entries but the Lanczos vectors have "
                f"{result.basis.shape[-1]}; pass the params the operator was built on."
            )
        result = result._replace(basis=result.basis[..., :size])
        unravel = ravel_pytree(like)[1]
    k = int(result.num_steps)
    tridiag = np.asarray(result.tridiag, np.float64)
    if not np.all(np.isfinite(tridiag)):
        raise ValueError("the tridiagonal contains NaN or Inf; the Lanczos run failed.")
    values, vectors = np.linalg.eigh(tridiag)
    basis = result.basis[:k]
    if isinstance(basis, np.ndarray):  # a float64 recurrence without x64: stay in NumPy
        ritz_vectors = vectors.T @ basis
    else:
        ritz_vectors = jnp.dot(jnp.asarray(vectors.T, basis.dtype), basis, precision=_HIGHEST)
    if unravel is not None:
        if isinstance(ritz_vectors, np.ndarray):  # params are float32 without x64
            ritz_vectors = jnp.asarray(ritz_vectors, np.float32)
        try:
            ritz_vectors = jax.vmap(unravel)(ritz_vectors)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"unravel failed on Ritz vectors of length {ritz_vectors.shape[-1]} ({err}). "
                "After lanczos(basis_sharding=...) on a dim the devices do not divide, the "
                "basis has zero columns past dim: pass like=params, which drops them."
            ) from err
    return values, ritz_vectors


def lanczos_alg(
    matrix_vector_product: Callable[[jax.Array], jax.Array], dim: int, order: int, rng_key
) -> tuple[jax.Array, jax.Array]:
    """The original package's ``lanczos_alg``: ``(tridiag (order, order), vecs (order, dim))``.

    Same meaning as in google/spectral-density's ``jax/lanczos.py``, computed by
    :func:`lanczos` (full reorthogonalisation, breakdown handled, float64 under x64).
    After a breakdown at step ``k < order`` (where the original produced NaN), rows and
    columns from ``k`` on are zero and a ``RuntimeWarning`` says so: eigenvalues of the whole
    ``tridiag`` then include ``order - k`` zeros that belong to the padding, not to the
    operator (their quadrature weights are zero). Use :func:`lanczos` to get ``num_steps``.
    """
    result = lanczos(matrix_vector_product, rng_key, order, dim=dim)
    warn_if_broke_down(
        result,
        order,
        "tridiag is zero past that block, so its eigenvalues include padding "
        "zeros with zero weight; jax_spectral.lanczos gives num_steps",
    )
    return result.padded_tridiag(), result.basis
