import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import classification_data, counted_batches, init_mlp, mlp_loss

import jax_spectral as js
from jax_spectral import eigv_to_density, hessian_operator, lanczos
from jax_spectral.slq import slq, spectral_density


@jax.tree_util.register_pytree_node_class
class DenseOperator:
    """A symmetric matrix as an operator (a traceable pytree, with matmat)."""

    traceable = True

    def __init__(self, a):
        self.a = jnp.asarray(a, jnp.float32)
        self.dim = self.a.shape[0]
        self.dtype = np.dtype(np.float32)

    def tree_flatten(self):
        return (self.a,), None

    @classmethod
    def tree_unflatten(cls, _, children):
        obj = object.__new__(cls)
        obj.a = children[0]
        obj.dim, obj.dtype = obj.a.shape[0], np.dtype(np.float32)
        return obj

    def matvec(self, v):
        return self.a @ v

    def matmat(self, vs):
        return vs @ self.a.T


def _diagonal_with_outliers():
    rng = np.random.default_rng(0)
    return np.r_[rng.uniform(0.0, 1.0, 995), [5.0, 8.0, 12.0, 20.0, 30.0]]


def _wishart():
    x = np.random.default_rng(1).standard_normal((2000, 1000))
    return x.T @ x / 2000  # Marchenko-Pastur, ratio 1/2


@pytest.mark.parametrize("case", ["diagonal", "wishart"])
def test_density_matches_the_exact_smoothed_density(case):
    if case == "diagonal":
        evals = _diagonal_with_outliers()
        a = np.diag(evals)
    else:
        a = _wishart()
        evals = np.linalg.eigvalsh(a)
    op = DenseOperator(a)
    result = slq(op, jax.random.key(0), num_probes=10, order=90)
    sigma_squared = 1e-3
    est = spectral_density(result, sigma_squared=sigma_squared, grid_len=4000)
    exact, _ = eigv_to_density(evals[None], grids=est.grid, sigma_squared=sigma_squared)
    dx = est.grid[1] - est.grid[0]
    assert np.sum(est.density) * dx == pytest.approx(1.0, rel=1e-9)
    assert np.sum(np.abs(est.density - exact)) * dx < 0.05
    assert np.all(est.stderr >= 0) and est.stderr.max() > 0
    # First moment per probe: sum_k w_k theta_k = v^T A v; its mean estimates tr(A) / n.
    moments = np.sum(result.weights * result.nodes, axis=1)
    mean, se = moments.mean(), moments.std(ddof=1) / np.sqrt(len(moments))
    assert abs(mean - np.trace(a) / a.shape[0]) <= 3 * se


def _mlp_operator(loop):
    """A small MLP's Hessian over 37 samples in batches of 8: scanned, host loop or stream."""
    params = init_mlp(jax.random.key(0), [5, 6, 3])
    x, y = classification_data(jax.random.key(1), 37, 5, 3)
    if loop == "stream":
        return hessian_operator(
            mlp_loss, params, [(x[i : i + 8], y[i : i + 8]) for i in range(0, 37, 8)]
        )
    return hessian_operator(mlp_loss, params, (x, y), batch_size=8, loop=loop)


@pytest.mark.parametrize("loop", ["scan", "host", "stream"])
def test_probes_in_lockstep_equal_probes_one_at_a_time(loop):
    op = _mlp_operator(loop)
    key = jax.random.key(2)
    together = slq(op, key, num_probes=4, order=12)
    keys = jax.random.split(key, 4)
    for i in range(4):
        alone = lanczos(op, keys[i], 12)
        np.testing.assert_allclose(together.lanczos.tridiag[i], alone.tridiag, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(together.weights.sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("chunk", [None, 1, 2, 5])
def test_matmat_reads_each_batch_once_for_all_probes(chunk):
    params = init_mlp(jax.random.key(0), [5, 6, 3])
    x, y = classification_data(jax.random.key(1), 20, 5, 3)
    batches, reads = counted_batches(x, y, 8)
    op = hessian_operator(mlp_loss, params, batches)
    vs = jax.random.normal(jax.random.key(3), (5, op.dim))
    reads.clear()
    together = op.matmat(vs, chunk=chunk)
    assert len(reads) == 3  # one pass over the three batches serves all five vectors
    separate = np.stack([op.matvec(v) for v in vs])
    np.testing.assert_allclose(together, separate, rtol=1e-5, atol=1e-6)
    for loop in ("host", "scan"):
        in_memory = hessian_operator(mlp_loss, params, (x, y), batch_size=8, loop=loop)
        got = in_memory.matmat(vs, chunk=chunk)
        np.testing.assert_allclose(got, separate, rtol=1e-5, atol=1e-6)


def test_probe_products_take_about_twice_the_memory_of_one(monkeypatch):
    """XLA's own count of working memory: 10 probes' products (matmat, SLQ's step) in
    chunks sized from one probe's memory stay within twice one product's, where a vmap
    over all of them takes many times more (which shows the check can fail)."""
    from jax_spectral import operators

    monkeypatch.setattr(operators, "TANGENT_MEMORY_FLOOR", 0)  # as for a large model
    # Activations dominate the product's memory, as in a convnet (where the vectors
    # themselves, 10 x dim entries for inputs, sums and outputs, come on top).
    params = init_mlp(jax.random.key(0), [32, 64, 10])
    x, y = classification_data(jax.random.key(1), 2048, 32, 10)
    op = hessian_operator(mlp_loss, params, (x, y), batch_size=2048)
    vs = jax.random.normal(jax.random.key(3), (10, op.dim))

    def temp(fn, arg):
        return jax.jit(fn).lower(arg).compile().memory_analysis().temp_size_in_bytes

    one, chunked, vmapped = (
        temp(op.matvec, vs[0]),
        temp(op.matmat, vs),
        temp(jax.vmap(op.matvec), vs),
    )
    assert operators.tangent_chunk(op, 10) < 10
    assert chunked <= 2 * one < vmapped / 2, (one, chunked, vmapped)
    separate = np.stack([op.matvec(v) for v in vs])
    np.testing.assert_allclose(op.matmat(vs), separate, rtol=1e-4, atol=1e-6)
    cost = js.estimate(op, order=5, num_probes=10)
    assert cost.probe_chunk == operators.tangent_chunk(op, 10)
    assert f"run {cost.probe_chunk} at a time" in str(cost)


def test_matmat_rejects_a_bad_chunk():
    params = init_mlp(jax.random.key(0), [5, 6, 3])
    x, y = classification_data(jax.random.key(1), 20, 5, 3)
    op = hessian_operator(mlp_loss, params, (x, y), batch_size=8, loop="host")
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        op.matmat(jnp.ones((2, op.dim)), chunk=0)


def test_errors():
    op = DenseOperator(np.eye(3))
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,))
    sharding = NamedSharding(mesh, P(None, "data"))
    params = init_mlp(jax.random.key(0), [5, 6, 3])
    data = classification_data(jax.random.key(1), 20, 5, 3)
    host = hessian_operator(mlp_loss, params, data, batch_size=8, loop="host")
    with pytest.raises(ValueError, match="applies to traceable operators"):
        slq(host, jax.random.key(0), 3, num_probes=2, basis_sharding=sharding)
    scan = hessian_operator(mlp_loss, params, data, batch_size=8, loop="scan")
    one = slq(scan, jax.random.key(0), 6, num_probes=2, basis_sharding=sharding)  # a no-op
    plain = slq(scan, jax.random.key(0), 6, num_probes=2)
    np.testing.assert_array_equal(one.lanczos.tridiag, plain.lanczos.tridiag)
    with pytest.raises(ValueError, match="num_probes must be a positive int"):
        slq(op, jax.random.key(0), num_probes=0, order=3)
    with pytest.raises(ValueError, match="order must be a positive int"):
        slq(op, jax.random.key(0), num_probes=2, order=0)
    with pytest.raises(js.NonFiniteError, match="SLQ step 0") as info:
        slq(DenseOperator(np.full((3, 3), np.nan)), jax.random.key(0), num_probes=2, order=2)
    # one exception type for every algorithm, with the step and the partial result
    assert isinstance(info.value, FloatingPointError) and info.value.step == 0
    assert np.asarray(info.value.result.num_steps).tolist() == [0, 0]


@pytest.mark.parametrize("loop", ["scan", "host"])
def test_progress_reports_every_step_and_is_silent_by_default(loop, capsys):
    params = init_mlp(jax.random.key(0), [5, 6, 3])
    x, y = classification_data(jax.random.key(1), 20, 5, 3)
    op = hessian_operator(mlp_loss, params, (x, y), batch_size=8, loop=loop)
    seen = []
    slq(op, jax.random.key(0), num_probes=3, order=5, progress=lambda *s: seen.append(s[:2]))
    if loop == "host":  # every step; a scanned run reports after each (timed) segment
        assert seen == [(i, 5) for i in range(1, 6)]
    else:
        assert seen[-1] == (5, 5) and all(a < b for a, b in zip(seen[:-1], seen[1:], strict=True))
    slq(op, jax.random.key(0), num_probes=3, order=5)
    assert capsys.readouterr().err == ""
    slq(op, jax.random.key(0), num_probes=3, order=5, progress=True)
    err = capsys.readouterr().err
    assert "SLQ (3 probes)" in err and "5/5" in err


def test_breakdown_scan_and_host_agree_and_padding_has_no_weight():
    # A quadratic loss whose Hessian is diag(d) with three distinct eigenvalues: every
    # probe's Krylov space is exhausted after three steps.
    d = jnp.array([1.0, 1.0, 2.0, 2.0, 2.0, 5.0, 5.0, 5.0])

    def loss(w, batch):  # batches of ones: the mean over samples is 0.5 w^T diag(d) w
        return 0.5 * jnp.sum(d * w**2) * jnp.mean(batch)

    data = jnp.ones(12)
    results = {
        loop: slq(
            hessian_operator(loss, jnp.zeros(8), data, batch_size=5, loop=loop),
            jax.random.key(0),
            num_probes=3,
            order=6,
        )
        for loop in ("scan", "host")
    }
    for result in results.values():
        np.testing.assert_array_equal(result.lanczos.num_steps, [3, 3, 3])
        np.testing.assert_allclose(result.nodes[:, :3], np.tile([1.0, 2.0, 5.0], (3, 1)), rtol=1e-5)
        np.testing.assert_array_equal(result.weights[:, 3:], 0.0)
        np.testing.assert_allclose(result.weights.sum(axis=1), 1.0, rtol=1e-6)
        # The weight of each eigenvalue is the probe's squared mass on its eigenspace.
        starts = np.asarray(result.lanczos.basis[:, 0], np.float64)
        mass = np.stack([np.sum(starts[:, d == lam] ** 2, axis=1) for lam in (1.0, 2.0, 5.0)], 1)
        np.testing.assert_allclose(result.weights[:, :3], mass, rtol=1e-4)
    np.testing.assert_allclose(
        results["scan"].lanczos.tridiag, results["host"].lanczos.tridiag, rtol=1e-6, atol=1e-6
    )
    density = spectral_density(results["scan"], sigma_squared=1e-3, grid_len=500)
    margin = 5 * np.sqrt(1e-3 * 4.0) * 1.1  # EDGE_WIDTHS kernel widths beyond 1 and 5
    assert density.grid[0] > 1 - margin > 0 and density.grid[-1] < 5 + margin  # not to zero


@pytest.mark.parametrize("loop", ["scan", "host", "stream"])
def test_bases_in_host_memory_give_the_same_tridiagonals(loop):
    op = _mlp_operator(loop)
    on_device = slq(op, jax.random.key(2), num_probes=3, order=10)
    on_host = slq(op, jax.random.key(2), num_probes=3, order=10, basis_memory="host")
    np.testing.assert_allclose(
        on_host.lanczos.tridiag, on_device.lanczos.tridiag, rtol=1e-5, atol=1e-6
    )
    assert on_host.lanczos.basis.devices() == {jax.devices("cpu")[0]}
    with pytest.raises(ValueError, match="basis_memory must be"):
        slq(op, jax.random.key(2), num_probes=3, order=10, basis_memory="disk")


def test_memory_error_suggests_host_memory_when_the_device_is_full(monkeypatch):
    import jax_spectral.costs as costs

    params = init_mlp(jax.random.key(0), [5, 6, 3])
    x, y = classification_data(jax.random.key(1), 20, 5, 3)
    op = hessian_operator(mlp_loss, params, (x, y), batch_size=8)
    # The accelerator (the default device) is nearly full; the host has room.
    monkeypatch.setattr(
        costs, "free_device_bytes", lambda device=None: 1000 if device is None else 10**9
    )
    with pytest.raises(MemoryError, match="basis_memory='host'"):
        slq(op, jax.random.key(0), num_probes=4, order=10)
    slq(op, jax.random.key(0), num_probes=4, order=10, basis_memory="host")  # fits there
