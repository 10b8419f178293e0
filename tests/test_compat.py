"""The original package's JAX entry points (jax_spectral.compat), used as its users did,
against dense float64 references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import classification_data, init_mlp, mlp_loss
from jax.flatten_util import ravel_pytree

from jax_spectral import hessian_operator, lanczos
from jax_spectral.compat import density as density_lib
from jax_spectral.compat import hessian_computation
from jax_spectral.compat import lanczos as lanczos_lib


@pytest.fixture
def streamed(x64):
    """A float64 MLP, 23 samples streamed by a generator function in batches of 5 (the last
    of 3), and the dense Hessian of the mean loss over all samples."""
    params = init_mlp(jax.random.key(0), [3, 4, 2], jnp.float64)
    x, y = classification_data(jax.random.key(1), 23, 3, 2, jnp.float64)

    def batches():  # the original's pattern: a function that returns a generator
        for i in range(0, 23, 5):
            yield x[i : i + 5], y[i : i + 5]

    flat, unravel = ravel_pytree(params)
    dense = np.asarray(jax.hessian(lambda f: mlp_loss(unravel(f), (x, y)))(flat))
    return params, batches, (x, y), dense


def test_get_hvp_fn_is_the_exact_mean_over_streamed_batches(streamed):
    params, batches, _, dense = streamed
    hvp_fn, unravel, num_params = hessian_computation.get_hvp_fn(mlp_loss, params, batches)
    assert num_params == dense.shape[0] == 26
    v = np.asarray(jax.random.normal(jax.random.key(2), (num_params,), jnp.float64))
    np.testing.assert_allclose(hvp_fn(params, v), dense @ v, rtol=1e-10, atol=1e-12)
    assert jax.tree_util.tree_structure(unravel(v)) == jax.tree_util.tree_structure(params)
    # The original divided the sum of batch Hessians by the number of batches: with a
    # ragged last batch that is another matrix.
    flat, unflat = ravel_pytree(params)
    per_batch = [
        np.asarray(jax.hessian(lambda f, b=b: mlp_loss(unflat(f), b))(flat)) for b in batches()
    ]
    assert not np.allclose(hvp_fn(params, v), sum(per_batch) @ v / 5, rtol=1e-3)


def test_hvp_fn_takes_the_hessian_at_the_params_it_is_given(streamed):
    params, batches, (x, y), _ = streamed
    hvp_fn, _, num_params = hessian_computation.get_hvp_fn(mlp_loss, params, batches)
    moved = jax.tree_util.tree_map(lambda a: a + 0.3, params)
    flat, unravel = ravel_pytree(moved)
    dense = np.asarray(jax.hessian(lambda f: mlp_loss(unravel(f), (x, y)))(flat))
    v = np.ones(num_params)
    np.testing.assert_allclose(hvp_fn(moved, v), dense @ v, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="structure, shapes and dtypes"):
        hvp_fn({"other": jnp.ones(26)}, v)


def test_get_hvp_fn_refuses_empty_data_and_a_generator_object(streamed):
    params, batches, _, _ = streamed
    with pytest.raises(ValueError, match="empty"):
        hessian_computation.get_hvp_fn(mlp_loss, params, lambda: iter([]))
    with pytest.raises(ValueError, match="one-shot iterator"):
        hessian_computation.get_hvp_fn(mlp_loss, params, batches())


def test_full_hessian_of_a_loss_of_params_alone(streamed):
    params, _, (x, y), dense = streamed
    got = hessian_computation.full_hessian(functools.partial(mlp_loss, batch=(x, y)), params)
    np.testing.assert_allclose(got, dense, rtol=1e-12, atol=1e-12)


def test_lanczos_alg_on_a_closure_over_streamed_data_runs_in_the_host_loop(streamed):
    """The original's pattern: lanczos_alg(lambda v: hvp_fn(params, v), n, order, key).
    The closure reads batches on the host, so it cannot be traced; it runs from the host
    loop and gives the tridiagonal of the in-memory operator run as one lax.scan."""
    params, batches, arrays, dense = streamed
    hvp_fn, _, num_params = hessian_computation.get_hvp_fn(mlp_loss, params, batches)
    key = jax.random.key(3)
    tridiag, vecs = lanczos_lib.lanczos_alg(lambda v: hvp_fn(params, v), num_params, 12, key)
    scanned = lanczos(hessian_operator(mlp_loss, params, arrays, batch_size=5), key, 12)
    np.testing.assert_allclose(tridiag, scanned.tridiag, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(vecs, scanned.basis, rtol=1e-8, atol=1e-10)
    # The extreme Ritz values converge to the dense Hessian's extreme eigenvalues.
    ritz = np.linalg.eigvalsh(np.asarray(tridiag))
    exact = np.linalg.eigvalsh(dense)
    assert ritz[-1] == pytest.approx(exact[-1], rel=1e-6)


def test_a_host_only_closure_under_jit_is_refused_clearly(streamed):
    params, batches, _, _ = streamed
    hvp_fn, _, n = hessian_computation.get_hvp_fn(mlp_loss, params, batches)
    with pytest.raises(ValueError, match="matvec cannot be traced.*HostOnlyError"):
        jax.jit(lambda k: lanczos_lib.lanczos_alg(lambda v: hvp_fn(params, v), n, 4, k)[0])(
            jax.random.key(0)
        )


def test_a_bug_in_a_matvec_under_jit_is_reported_as_itself():
    b = jnp.ones((6, 5))
    with pytest.raises(ValueError, match="tracing it failed with TypeError: dot_general"):
        jax.jit(lambda k: lanczos(lambda v: b @ v, k, 3, dim=6).tridiag)(jax.random.key(0))


def test_the_traceability_probe_runs_once_per_function():
    traces = []

    def matvec(tree):
        traces.append(1)
        return {"w": 2.0 * tree["w"]}

    like = {"w": jnp.ones(5)}
    lanczos(matvec, jax.random.key(0), 3, like=like)
    first = len(traces)  # the probe and the compiled program
    lanczos(matvec, jax.random.key(1), 3, like=like)
    assert first == 2 and len(traces) == first


def test_a_numpy_matvec_runs_in_the_host_loop():
    """Any function that cannot be traced (here it converts its argument to NumPy)."""
    a = np.diag(np.arange(1.0, 7.0)).astype(np.float32)
    calls = []

    def matvec(v):
        calls.append(type(v))
        return a @ np.asarray(v)

    res = lanczos(matvec, jax.random.key(0), 6, dim=6)
    np.testing.assert_allclose(
        np.linalg.eigvalsh(np.asarray(res.tridiag, np.float64)), np.arange(1.0, 7.0), rtol=1e-5
    )
    # One abstract probe (a tracer, which the function cannot convert), then one eager
    # call per step on concrete arrays.
    assert issubclass(calls[0], jax.core.Tracer)
    assert len(calls) == 7 and not any(issubclass(c, jax.core.Tracer) for c in calls[1:])


def test_lanczos_alg_under_jit_and_density_on_a_traceable_product():
    """The original's lanczos_test: a jitted lanczos_alg of a symmetric matrix's product,
    then densities of several draws on one grid (original conventions)."""
    g = jax.random.normal(jax.random.key(0), (15, 15))
    matrix = g @ g.T
    get_tridiag = jax.jit(lambda k: lanczos_lib.lanczos_alg(lambda v: matrix @ v, 15, 15, k)[0])
    exact = np.linalg.eigvalsh(np.asarray(matrix, np.float64))
    draws = [get_tridiag(k) for k in jax.random.split(jax.random.key(1), 5)]
    for tridiag in draws:
        ritz = np.linalg.eigvalsh(np.asarray(tridiag, np.float64))
        np.testing.assert_allclose(ritz[[0, -1]], exact[[0, -1]], rtol=1e-4, atol=1e-4)
    nodes, weights = density_lib.tridiag_to_eigv(draws)
    assert nodes.shape == weights.shape == (5, 15)
    np.testing.assert_allclose(nodes, np.broadcast_to(exact, (5, 15)), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)
    # Weights are squared components of random unit vectors (mean 1/15 each), so five
    # draws give the uniform-weight density of the exact eigenvalues only roughly.
    density, grids = density_lib.tridiag_to_density(draws, sigma_squared=1e-2, grid_len=2000)
    true_density, _ = density_lib.eigv_to_density(exact[None], grids=grids, sigma_squared=1e-2)
    step = grids[1] - grids[0]
    assert np.sum(density) * step == pytest.approx(1.0, rel=1e-6)
    assert np.sum(np.abs(density - true_density)) * step < 0.6


def test_get_hvp_fn_reads_lists_and_arrays_on_the_host(streamed):
    """As in the original, so that a closure over hvp_fn never compiles the data in."""
    params, batches, (x, y), dense = streamed
    v = np.ones(dense.shape[0])
    for data in (list(batches()), (x, y)):
        hvp_fn, _, _ = hessian_computation.get_hvp_fn(mlp_loss, params, data)
        np.testing.assert_allclose(hvp_fn(params, v), dense @ v, rtol=1e-10, atol=1e-12)
        with pytest.raises(ValueError, match="cannot be traced"):
            jax.jit(lambda u, f=hvp_fn: f(params, u))(v)
