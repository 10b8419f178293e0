import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import classification_data, init_mlp, mlp_apply, mlp_loss
from jax.flatten_util import ravel_pytree

from jax_spectral import hessian_operator, lanczos, lanczos_alg, ritz, tridiag_to_eigv
from jax_spectral import slq as js_slq


def _sym(key, n, dtype=jnp.float64):
    a = jax.random.normal(key, (n, n), dtype)
    return (a + a.T) / 2


def _dense_mlp_hessian(params, batch):
    flat, unravel = ravel_pytree(params)
    return np.asarray(jax.hessian(lambda f: mlp_loss(unravel(f), batch))(flat))


def test_original_linear_check(x64):
    """16 features, 50 samples, MSE: V^T T V equals 2 X^T X / 50 at order 16."""
    x = np.asarray(jax.random.normal(jax.random.key(0), (50, 16), jnp.float64))
    y = np.asarray(jax.random.normal(jax.random.key(1), (50,), jnp.float64))

    def loss(w, batch):
        xb, yb = batch
        return jnp.mean((xb @ w - yb) ** 2)

    op = hessian_operator(loss, jnp.zeros(16), (x, y), batch_size=7)
    res = lanczos(op, jax.random.key(2), 16)
    assert int(res.num_steps) == 16
    v, t = np.asarray(res.basis), np.asarray(res.tridiag)
    want = 2 * x.T @ x / 50
    np.testing.assert_allclose(v.T @ t @ v, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_order_equal_dim_reproduces_every_eigenvalue(x64):
    """A regression MLP (no continuous symmetry, so no repeated eigenvalues)."""
    params = init_mlp(jax.random.key(0), [6, 9, 3], jnp.float64)  # 93 parameters
    x = jax.random.normal(jax.random.key(1), (40, 6), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (40, 3), jnp.float64)

    def mse(p, batch):
        return jnp.mean((mlp_apply(p, batch[0]) - batch[1]) ** 2)

    flat, unravel = ravel_pytree(params)
    dense = np.asarray(jax.hessian(lambda f: mse(unravel(f), (x, y)))(flat))
    dim = dense.shape[0]
    assert 80 <= dim <= 120
    op = hessian_operator(mse, params, (x, y), batch_size=16)
    res = lanczos(op, jax.random.key(3), dim)
    assert int(res.num_steps) == dim
    got = np.linalg.eigvalsh(np.asarray(res.tridiag))
    want = np.linalg.eigvalsh(dense)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())


def test_softmax_null_space_is_one_node_and_the_run_stops_there(x64):
    """Softmax cross-entropy is invariant to shifting all logits: the last layer adds
    hidden + 1 exact zero eigenvalues. From one start vector Lanczos sees each distinct
    eigenvalue once, so it breaks down after (number of distinct eigenvalues) steps."""
    params = init_mlp(jax.random.key(0), [6, 8, 4], jnp.float64)  # 92 parameters
    batch = classification_data(jax.random.key(1), 40, 6, 4, jnp.float64)
    dense = _dense_mlp_hessian(params, batch)
    want = np.linalg.eigvalsh(dense)
    scale = np.abs(want).max()
    null = np.abs(want) < 1e-10 * scale
    assert null.sum() == 8 + 1
    res = lanczos(hessian_operator(mlp_loss, params, batch), jax.random.key(3), dense.shape[0])
    k = int(res.num_steps)
    assert k == dense.shape[0] - null.sum() + 1
    got = np.linalg.eigvalsh(np.asarray(res.tridiag)[:k, :k])
    np.testing.assert_allclose(np.sort(np.r_[want[~null], 0.0]), got, rtol=0, atol=1e-6 * scale)


def test_partial_order_basis_and_three_term_relation():
    a = _sym(jax.random.key(0), 60, jnp.float32)
    m = 12
    res = lanczos(lambda v: a @ v, jax.random.key(1), m, dim=60)
    v, t = np.asarray(res.basis, np.float64), np.asarray(res.tridiag, np.float64)
    assert res.basis.dtype == jnp.float32
    np.testing.assert_allclose(v @ v.T, np.eye(m), atol=1e-5)
    # A V^T - V^T T = beta_m v_m e_m^T: zero except in the last column.
    resid = np.asarray(a, np.float64) @ v.T - v.T @ t
    scale = np.abs(np.asarray(a)).max()
    np.testing.assert_allclose(resid[:, :-1], 0, atol=2e-5 * scale)
    last = np.linalg.norm(resid[:, -1])
    assert last > 1e-2 * scale
    np.testing.assert_allclose(last, float(res.residual_norm), rtol=1e-4)
    # T is symmetric tridiagonal.
    assert np.all(np.triu(t, 2) == 0) and np.all(t == t.T)


def test_gauss_quadrature_is_exact_to_degree_2m_minus_1(x64):
    n, m = 40, 6
    a = np.asarray(_sym(jax.random.key(0), n)) / 3
    v0 = np.array(jax.random.normal(jax.random.key(1), (n,), jnp.float64))
    v0 /= np.linalg.norm(v0)
    res = lanczos(lambda v: jnp.asarray(a) @ v, None, m, v0=jnp.asarray(v0))
    theta, s = np.linalg.eigh(np.asarray(res.tridiag))
    w = s[0] ** 2
    power = v0.copy()
    for p in range(2 * m):
        moment = v0 @ power  # v0^T A^p v0
        np.testing.assert_allclose(np.sum(w * theta**p), moment, rtol=1e-8, atol=1e-12)
        power = a @ power


@pytest.mark.slow
def test_digits_mlp_top_ritz_values_match_dense_eigh(digits_dense):
    """A 2,410-parameter MLP trained on digits: top 5 at order 80 vs float64 eigh."""
    loss, params, (x, y), dense = digits_dense
    # Lanczos in the model's float32, as a user runs it.
    op = hessian_operator(loss, params, (x, y), batch_size=512)
    res = lanczos(op, jax.random.key(1), 80)
    top = np.sort(np.linalg.eigvalsh(np.asarray(res.tridiag, np.float64)))[-5:]
    want = np.linalg.eigvalsh(dense)[-5:]
    np.testing.assert_allclose(top, want, rtol=1e-5)


def test_breakdown_when_order_exceeds_rank(x64):
    u = np.linalg.qr(np.asarray(jax.random.normal(jax.random.key(0), (10, 3), jnp.float64)))[0]
    a = jnp.asarray(u @ np.diag([1.0, 2.0, 5.0]) @ u.T)  # rank 3: distinct eigenvalues 0, 1, 2, 5
    res = lanczos(lambda v: a @ v, jax.random.key(1), 8, dim=10)
    k = int(res.num_steps)
    assert k == 4
    t, v = np.asarray(res.tridiag), np.asarray(res.basis)
    assert np.all(np.isfinite(t)) and np.all(np.isfinite(v))
    np.testing.assert_allclose(np.linalg.eigvalsh(t[:k, :k]), [0, 1, 2, 5], atol=1e-10)
    assert np.all(t[k:] == 0) and np.all(t[:, k:] == 0) and np.all(v[k:] == 0)
    np.testing.assert_allclose(v[:k] @ v[:k].T, np.eye(k), atol=1e-12)
    assert float(res.residual_norm) == 0
    assert int(res.nonfinite_step) == -1


def test_breakdown_when_order_exceeds_dim_float32():
    a = jnp.diag(jnp.arange(1.0, 6.0))
    res = lanczos(lambda v: a @ v, jax.random.key(0), 9, dim=5)
    assert int(res.num_steps) == 5
    assert np.all(np.isfinite(np.asarray(res.tridiag)))
    np.testing.assert_allclose(
        np.linalg.eigvalsh(np.asarray(res.tridiag)[:5, :5]), [1, 2, 3, 4, 5], rtol=1e-5
    )


def test_zero_operator_breaks_down_at_the_first_step():
    with pytest.warns(RuntimeWarning, match="every matrix-vector product was exactly zero"):
        res = lanczos(lambda v: 0 * v, jax.random.key(0), 4, dim=6)
    assert int(res.num_steps) == 1
    assert np.all(np.asarray(res.tridiag) == 0)


@pytest.mark.slow
def test_an_underflowing_loss_is_not_a_silent_zero_spectrum():
    """A float32 loss scaled by 1e-38: every HVP underflows to exactly zero."""
    from jax_spectral import slq

    params = init_mlp(jax.random.key(0), [4, 6, 3])
    data = classification_data(jax.random.key(1), 40, 4, 3)
    op = hessian_operator(lambda p, b: 1e-38 * mlp_loss(p, b), params, data, batch_size=16)
    assert np.all(np.asarray(op.matvec(jnp.ones(op.dim))) == 0)
    with pytest.warns(RuntimeWarning, match="underflowed"):
        lanczos(op, jax.random.key(2), 10)
    with pytest.warns(RuntimeWarning, match="underflowed"):
        slq(op, jax.random.key(2), num_probes=2, order=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a normal loss: no warning
        lanczos(hessian_operator(mlp_loss, params, data, batch_size=16), jax.random.key(2), 10)


def test_scan_and_host_loops_agree():
    params = init_mlp(jax.random.key(0), [5, 6, 3])
    batch = classification_data(jax.random.key(1), 37, 5, 3)
    op_scan = hessian_operator(mlp_loss, params, batch, batch_size=8, loop="scan")
    op_host = hessian_operator(mlp_loss, params, batch, batch_size=8, loop="host")
    key = jax.random.key(2)
    a = lanczos(op_scan, key, 20)
    b = lanczos(op_host, key, 20)
    c = lanczos(op_scan, key, 20, loop="host")
    for other in (b, c):
        np.testing.assert_allclose(a.tridiag, other.tridiag, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.basis, other.basis, atol=1e-4)
        assert int(a.num_steps) == int(other.num_steps) == 20


def test_compiles_once_per_shape_and_vmaps_over_keys():
    a = _sym(jax.random.key(0), 30, jnp.float32)
    traces = []

    def matvec(v):
        traces.append(1)  # Python side effect: runs only when traced
        return a @ v

    keys = jax.random.split(jax.random.key(1), 3)
    single = [lanczos(matvec, k, 10, dim=30) for k in keys]
    # One abstract trace (can the function be traced? eval_shape caches it) and one for
    # the compiled program; the other keys reuse both.
    assert len(traces) == 2
    batched = jax.vmap(lambda k: lanczos(matvec, k, 10, dim=30))(keys)
    assert batched.tridiag.shape == (3, 10, 10) and batched.basis.shape == (3, 10, 30)
    for i, res in enumerate(single):
        np.testing.assert_allclose(batched.tridiag[i], res.tridiag, rtol=1e-5, atol=1e-5)
    jitted = jax.jit(lambda k: lanczos(matvec, k, 10, dim=30).tridiag)(keys[0])
    np.testing.assert_allclose(jitted, single[0].tridiag, rtol=1e-5, atol=1e-5)


def test_operator_data_are_arguments_not_constants_and_compile_once():
    params = init_mlp(jax.random.key(0), [50, 6, 3])
    batch = classification_data(jax.random.key(1), 2000, 50, 3)  # 100,000 floats of data
    op = hessian_operator(mlp_loss, params, batch, batch_size=500)
    lowered = jax.jit(lambda o, v: o.matvec(v)).lower(op, jnp.ones(op.dim)).as_text()
    assert len(lowered) < 100_000  # embedded as constants, the data alone would take ~1 MB

    from jax_spectral.lanczos import _scan_lanczos

    lanczos(op, jax.random.key(0), 6)
    before = _scan_lanczos._cache_size()
    lanczos(op, jax.random.key(5), 6)
    lanczos(op.matvec, jax.random.key(6), 6)
    assert _scan_lanczos._cache_size() == before


def test_lanczos_on_params_pytrees():
    params = init_mlp(jax.random.key(0), [5, 6, 3])
    batch = classification_data(jax.random.key(1), 30, 5, 3)
    op = hessian_operator(mlp_loss, params, batch)

    def tree_matvec(tree):
        return op.matvec_tree(tree)

    key = jax.random.key(2)
    flat = lanczos(op, key, 8)
    tree = lanczos(tree_matvec, key, 8, like=params)
    np.testing.assert_allclose(tree.tridiag, flat.tridiag, rtol=1e-5, atol=1e-6)
    # A params-shaped start vector works as the template too.
    start = jax.tree_util.tree_map(jnp.ones_like, params)
    from_start = lanczos(tree_matvec, None, 8, v0=start)
    from_flat = lanczos(op, None, 8, v0=jnp.ones(op.dim))
    np.testing.assert_allclose(from_start.tridiag, from_flat.tridiag, rtol=1e-5, atol=1e-6)
    # Ritz vectors come back params-shaped and orthonormal, with the residual that the
    # Lanczos relation predicts: |A y - theta y| = beta_m |s_m| (last component of s).
    values, vectors = ritz(flat, like=params)
    assert vectors["layer0"]["w"].shape == (8, 5, 6)
    flat_vecs = jax.vmap(lambda t: ravel_pytree(t)[0])(vectors)
    np.testing.assert_allclose(flat_vecs @ flat_vecs.T, np.eye(8), atol=1e-5)
    top = flat_vecs[-1]
    residual = np.linalg.norm(op.matvec(top) - values[-1] * top)
    s_last = np.linalg.eigh(np.asarray(flat.tridiag, np.float64))[1][-1, -1]
    np.testing.assert_allclose(residual, float(flat.residual_norm) * abs(s_last), rtol=1e-3)


def test_lanczos_alg_compat(x64):
    a = _sym(jax.random.key(0), 8)
    tridiag, vecs = lanczos_alg(lambda v: a @ v, 8, 5, jax.random.key(1))
    assert tridiag.shape == (5, 5) and vecs.shape == (5, 8)
    tridiag, vecs = lanczos_alg(lambda v: a @ v, 8, 8, jax.random.key(1))
    np.testing.assert_allclose(
        np.linalg.eigvalsh(np.asarray(tridiag)), np.linalg.eigvalsh(np.asarray(a)), atol=1e-10
    )
    np.testing.assert_allclose(vecs @ vecs.T, np.eye(8), atol=1e-12)


def test_lanczos_alg_warns_about_padding_after_breakdown():
    a = jnp.diag(jnp.arange(11.0, 19.0))
    with pytest.warns(RuntimeWarning, match="broke down after 8 of 10 steps"):
        tridiag, _ = lanczos_alg(lambda v: a @ v, 8, 10, jax.random.key(0))
    assert np.all(np.asarray(tridiag)[8:] == 0)


def test_null_space_ends_the_recurrence(x64):
    """Rank 10 in dimension 50: the basis reaches the null space after 11 steps."""
    q = np.linalg.qr(np.asarray(jax.random.normal(jax.random.key(0), (50, 50), jnp.float64)))[0]
    evals = np.r_[np.logspace(-4, 2, 10), np.zeros(40)]
    a = jnp.asarray((q * evals) @ q.T)
    v0 = np.asarray(jax.random.normal(jax.random.key(1), (50,), jnp.float64))
    res = lanczos(lambda v: a @ v, None, 30, v0=jnp.asarray(v0))
    assert int(res.num_steps) == 11
    nodes, weights = tridiag_to_eigv(np.asarray(res.tridiag)[:11, :11])
    null_mass = np.sum((q[:, 10:].T @ (v0 / np.linalg.norm(v0))) ** 2)
    assert weights[0][np.abs(nodes[0]) < 1e-10].sum() == pytest.approx(null_mass, rel=1e-8)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_operators_run_the_recurrence_in_float32(dtype):
    a = jnp.diag(jnp.linspace(300.0, 2400.0, 12)).astype(dtype)  # |A v|^2 overflows float16
    res = lanczos(lambda v: a @ v.astype(dtype), jax.random.key(0), 12, dim=12)
    assert res.tridiag.dtype == jnp.float32 and res.basis.dtype == jnp.float32
    assert int(res.num_steps) == 12
    got = np.linalg.eigvalsh(np.asarray(res.tridiag, np.float64))
    np.testing.assert_allclose(got, np.linspace(300.0, 2400.0, 12), rtol=1e-2)


def test_large_entries_do_not_overflow_the_norms():
    a = jnp.diag(jnp.linspace(1.0, 4.0, 6) * 1e20)  # squares overflow float32
    res = lanczos(lambda v: a @ v, jax.random.key(0), 6, dim=6)
    assert int(res.num_steps) == 6 and int(res.nonfinite_step) == -1
    got = np.linalg.eigvalsh(np.asarray(res.tridiag, np.float64))
    np.testing.assert_allclose(got, np.linspace(1.0, 4.0, 6) * 1e20, rtol=1e-4)


def test_without_reorthogonalisation_both_drivers_agree():
    a = jnp.diag(jnp.linspace(0.0, 1.0, 200) ** 3)
    scan = lanczos(lambda v: a @ v, jax.random.key(0), 40, dim=200, reorthogonalize=False)
    host = lanczos(
        lambda v: a @ v, jax.random.key(0), 40, dim=200, reorthogonalize=False, loop="host"
    )
    np.testing.assert_allclose(scan.tridiag, host.tridiag, rtol=1e-5, atol=1e-6)
    # Plain Lanczos still finds the extreme eigenvalue.
    assert np.linalg.eigvalsh(np.asarray(scan.tridiag, np.float64))[-1] == pytest.approx(
        1.0, rel=1e-5
    )


def test_partial_and_bound_methods_pass_arrays_as_arguments():
    params = init_mlp(jax.random.key(0), [50, 6, 3])
    batch = classification_data(jax.random.key(1), 2000, 50, 3)
    op = hessian_operator(mlp_loss, params, batch, batch_size=500)
    from jax_spectral.lanczos import Steps, _init_jit, _scan_lanczos, _scan_segment

    key = jax.random.key(0)
    reference = lanczos(op, key, 5)
    before = _scan_segment._cache_size()
    tree = lanczos(op.matvec_tree, key, 5, like=params)  # recognised as the operator
    assert _scan_segment._cache_size() == before
    np.testing.assert_allclose(tree.tridiag, reference.tridiag, rtol=1e-6)

    def apply(operator, v):
        return operator.matvec(v)

    wrapped = jax.tree_util.Partial(apply, op)
    state = _init_jit(jnp.ones(op.dim), 5)
    steps = Steps(reorthogonalize=True, tol=1e-5, products=None, basis_sharding=None)
    for hlo in (
        _scan_lanczos.lower(None, wrapped, None, jnp.ones(op.dim), order=5, steps=steps).as_text(),
        _scan_segment.lower(
            None, wrapped, None, state, jnp.int32(0), jnp.int32(5), steps=steps
        ).as_text(),
    ):
        assert len(hlo) < 200_000  # the 100,000 data floats are arguments, not constants
    np.testing.assert_allclose(
        lanczos(wrapped, key, 5, dim=op.dim).tridiag, reference.tridiag, rtol=1e-6
    )


@pytest.mark.parametrize("loop", ["host", "scan"])
def test_progress_callback_bar_and_silence(loop, capsys):
    a = jnp.diag(jnp.arange(1.0, 9.0))
    op = jax.tree_util.Partial(jnp.matmul, a)  # its array is an argument, not a constant
    seen = []
    silent = lanczos(op, jax.random.key(0), 4, dim=8, loop=loop)
    reported = lanczos(
        op, jax.random.key(0), 4, dim=8, loop=loop, progress=lambda *s: seen.append(s)
    )
    if loop == "host":  # every step; a scanned run reports after each (timed) segment
        assert [s[:2] for s in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    else:
        assert seen[-1][:2] == (4, 4)
        assert all(a[0] < b[0] for a, b in zip(seen[:-1], seen[1:], strict=True))
    assert all(later[2] >= earlier[2] for earlier, later in zip(seen[:-1], seen[1:], strict=True))
    np.testing.assert_array_equal(reported.tridiag, silent.tridiag)
    assert capsys.readouterr().err == ""  # silent by default and with a callback
    lanczos(op, jax.random.key(0), 3, dim=8, loop=loop, progress=True)
    err = capsys.readouterr().err
    assert "lanczos" in err and "3/3" in err  # a tqdm bar on stderr


def test_progress_stops_at_breakdown_and_rejects_junk():
    a = jnp.diag(jnp.array([1.0, 1.0, 2.0, 2.0]))  # two distinct eigenvalues
    seen = []
    result = lanczos(
        lambda v: a @ v,
        jax.random.key(0),
        4,
        dim=4,
        loop="host",
        progress=lambda *s: seen.append(s[:2]),
    )
    assert int(result.num_steps) == 2 and seen[-1] == (4, 4)  # the bar completes
    with pytest.raises(TypeError, match="progress must be a bool or a callable"):
        lanczos(lambda v: a @ v, jax.random.key(0), 2, dim=4, progress="yes")


# -- documented errors ------------------------------------------------------------------


@pytest.mark.parametrize("order, exc", [(0, ValueError), (-3, ValueError), (2.5, TypeError)])
def test_bad_order(order, exc):
    with pytest.raises(exc, match="order must be a positive int"):
        lanczos(lambda v: v, jax.random.key(0), order, dim=4)


def test_bad_dim_start_vector_and_matvec():
    with pytest.raises(ValueError, match="dim must be a positive int"):
        lanczos(lambda v: v, jax.random.key(0), 3, dim=0)
    with pytest.raises(ValueError, match="start vector has shape \\(3,\\), expected \\(4,\\)"):
        lanczos(lambda v: v, None, 3, dim=4, v0=jnp.ones(3))
    with pytest.raises(TypeError, match="matvec must be callable or an operator"):
        lanczos(np.eye(3), jax.random.key(0), 3, dim=3)


def test_a_failed_run_keeps_its_valid_steps_apart_from_the_nan():
    a = jnp.diag(jnp.arange(1.0, 9.0))
    calls = []

    def matvec(v):
        calls.append(1)
        return a @ v if len(calls) < 3 else v * jnp.nan

    with pytest.raises(FloatingPointError) as info:
        lanczos(matvec, jax.random.key(0), 5, dim=8, loop="host")
    failed = info.value.result
    assert int(failed.num_steps) == 2 and int(failed.nonfinite_step) == 2
    # The valid block and its Ritz values: finite, inside the spectrum [1, 8].
    assert failed.tridiag.shape == (2, 2) and np.all(np.isfinite(failed.tridiag))
    values, vectors = ritz(failed)
    assert values.shape == (2,) and 1 - 1e-4 <= values.min() <= values.max() <= 8 + 1e-4
    u = np.asarray(vectors, np.float64)
    np.testing.assert_allclose(u @ u.T, np.eye(2), atol=1e-5)  # orthonormal Ritz vectors
    # The padded matrix (the original package's shape) is NaN from the failed step on, so
    # it cannot pass for a spectrum.
    padded = np.asarray(failed.padded_tridiag())
    assert np.all(np.isfinite(padded[:2, :2])) and np.all(np.isnan(padded[2:])), padded
    assert np.all(np.isnan(padded[:, 2:]))


def test_ritz_checks_its_template_and_refuses_a_batch():
    params = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
    res = lanczos(lambda v: 2 * v, jax.random.key(0), 3, dim=9)
    wrong = {"w": jnp.zeros((2, 3))}
    with pytest.raises(ValueError, match="like= has 6 entries but the Lanczos vectors have 9"):
        ritz(res, like=wrong)
    values, vectors = ritz(res, like=params)
    assert vectors["w"].shape == (1, 2, 3)  # 2 I breaks down after one step
    batch = jax.vmap(lambda k: lanczos(lambda v: 2 * v, k, 3, dim=9))(
        jax.random.split(jax.random.key(0), 2)
    )
    with pytest.raises(ValueError, match="holds a batch of runs"):
        ritz(batch)


def test_missing_dim_and_key():
    with pytest.raises(ValueError, match="cannot tell the vector length"):
        lanczos(lambda v: v, jax.random.key(0), 3)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        lanczos(lambda v: v, None, 3, dim=4)
    with pytest.raises(ValueError, match="finite and non-zero; its norm is 0.0"):
        lanczos(lambda v: v, None, 3, v0=jnp.zeros(4))
    with pytest.raises(ValueError, match="finite and non-zero; its norm is nan"):
        lanczos(lambda v: v, None, 3, v0=jnp.array([1.0, jnp.nan]))
    with pytest.raises(ValueError, match="loop must be"):
        lanczos(lambda v: v, jax.random.key(0), 3, dim=4, loop="python")


def test_host_only_operator_refuses_scan_and_tracing():
    op = hessian_operator(
        lambda p, b: jnp.sum((b[0] @ p) ** 2), jnp.ones(2), lambda: iter([(np.ones((3, 2)),)])
    )
    assert not op.traceable
    with pytest.raises(ValueError, match="cannot run inside lax.scan"):
        lanczos(op, jax.random.key(0), 2, loop="scan")
    with pytest.raises(ValueError, match="cannot run under jit or vmap"):
        jax.vmap(lambda k: lanczos(op, k, 2).tridiag)(jax.random.split(jax.random.key(0), 2))
    res = lanczos(op, jax.random.key(0), 2)  # the default for it is the host loop
    assert int(res.num_steps) == 2


def test_non_finite_product_raises_naming_the_step_and_keeps_the_valid_part():
    a = jnp.diag(jnp.arange(1.0, 9.0))
    calls = []

    def matvec(v):
        calls.append(1)
        return a @ v if len(calls) != 4 else jnp.full_like(v, jnp.inf)

    with pytest.raises(FloatingPointError, match="Lanczos step 3 ") as info:
        lanczos(matvec, jax.random.key(0), 6, dim=8, loop="host")
    partial = info.value.result
    assert int(partial.num_steps) == 3
    assert np.all(np.isfinite(np.asarray(partial.tridiag)[:3, :3]))
    assert np.all(np.isnan(np.asarray(partial.tridiag)[3:, 3:]))


def test_non_finite_product_under_vmap_is_reported_not_hidden():
    def matvec(v):
        return v * jnp.nan

    res = jax.vmap(lambda k: lanczos(matvec, k, 3, dim=4))(jax.random.split(jax.random.key(0), 2))
    assert np.all(np.asarray(res.nonfinite_step) == 0)
    assert np.all(np.isnan(np.asarray(res.tridiag)))


def test_float64_recurrence_on_float32_products_without_x64():
    """The original TF2 test: diag(1, 2, 3) at order 3 gives V T V^T to 1e-7. The float64
    recurrence does (float32 rounding of the vectors for the products is the only error);
    x64 stays off for the rest of the program and the results are NumPy float64."""
    assert not jax.config.jax_enable_x64
    q = jnp.diag(jnp.array([1.0, 2.0, 3.0]))
    for loop in ("scan", "host"):
        res = lanczos(
            lambda v: q @ v, jax.random.key(0), 3, dim=3, loop=loop, recurrence_dtype="float64"
        )
        assert isinstance(res.tridiag, np.ndarray) and res.tridiag.dtype == np.float64
        assert isinstance(res.basis, np.ndarray) and res.basis.dtype == np.float64
        v, t = res.basis.T, res.tridiag
        np.testing.assert_allclose(v @ t @ v.T, np.diag([1.0, 2.0, 3.0]), atol=1e-7, rtol=0)
        np.testing.assert_allclose(v.T @ v, np.eye(3), atol=1e-14)
    assert not jax.config.jax_enable_x64 and jnp.zeros(()).dtype == np.float32
    values, vectors = ritz(res)  # NumPy in, NumPy out: no truncation to float32
    assert vectors.dtype == np.float64
    np.testing.assert_allclose(values, [1.0, 2.0, 3.0], rtol=1e-7)


def test_float64_recurrence_products_run_as_without_it():
    """The products see float32 vectors and are traced with x64 off, so a loss that makes
    default-dtype arrays computes in float32 exactly as it would otherwise."""
    seen = []

    def matvec(v):
        seen.append((v.dtype, jnp.zeros(()).dtype))
        return jnp.arange(1.0, 5.0) * v

    for loop in ("scan", "host"):
        seen.clear()
        res = lanczos(matvec, jax.random.key(0), 4, dim=4, loop=loop, recurrence_dtype=jnp.float64)
        assert seen and set(seen) == {(np.dtype(np.float32), np.dtype(np.float32))}
        np.testing.assert_allclose(np.linalg.eigvalsh(res.tridiag), [1, 2, 3, 4], rtol=1e-6)

    def scaled(m, v):  # NumPy float64 arrays in a Partial: float32 arrays, as in any JAX call
        seen.append((m.dtype, v.dtype))
        return m @ v

    seen.clear()
    lanczos(
        jax.tree_util.Partial(scaled, np.diag(np.arange(1.0, 5.0))),
        jax.random.key(0),
        4,
        dim=4,
        recurrence_dtype="float64",
    )
    assert set(seen) == {(np.dtype(np.float32), np.dtype(np.float32))}
    # Without recurrence_dtype nothing is float64, even for a float64 NumPy start vector.
    res = lanczos(matvec, None, 4, v0=np.arange(1.0, 5.0))
    assert res.tridiag.dtype == np.float32 and isinstance(res.tridiag, jax.Array)


@pytest.mark.slow
def test_float64_recurrence_equals_the_same_run_with_x64_on():
    data = classification_data(jax.random.key(1), 50, 4, 3)
    op = hessian_operator(mlp_loss, init_mlp(jax.random.key(0), [4, 6, 3]), data, batch_size=16)
    local = lanczos(op, jax.random.key(2), 20, recurrence_dtype="float64")
    with jax.enable_x64(True):
        everywhere = lanczos(op, jax.random.key(2), 20, recurrence_dtype="float64")
        assert everywhere.tridiag.dtype == jnp.float64
        np.testing.assert_allclose(
            local.tridiag, np.asarray(everywhere.tridiag), rtol=1e-12, atol=1e-14
        )
        np.testing.assert_allclose(local.basis, np.asarray(everywhere.basis), atol=1e-12)
    default = lanczos(op, jax.random.key(2), 20)  # the same start vector, float32
    assert default.tridiag.dtype == np.float32
    np.testing.assert_allclose(local.tridiag, default.tridiag, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_float64_recurrence_keeps_the_digits_basis_orthonormal(digits_dense):
    """Order 90 on the digits MLP: the float32 recurrence (reorthogonalised twice) keeps
    |V V^T - I| near float32 rounding; the float64 one near float64 rounding. Ritz values
    are limited by the float32 products either way."""
    loss, params, (x, y), dense = digits_dense
    op = hessian_operator(loss, params, (x, y), batch_size=512)
    want = np.linalg.eigvalsh(dense)[-5:]
    for dtype, bound in (("float32", 5e-6), ("float64", 1e-13)):
        res = lanczos(op, jax.random.key(1), 90, recurrence_dtype=dtype)
        basis = np.asarray(res.basis, np.float64)
        assert np.abs(basis @ basis.T - np.eye(90)).max() < bound, dtype
        top = np.linalg.eigvalsh(np.asarray(res.tridiag, np.float64))[-5:]
        np.testing.assert_allclose(top, want, rtol=1e-5, err_msg=dtype)


def test_float64_recurrence_checkpoints_and_resumes(tmp_path):
    product = jax.tree_util.Partial(jnp.matmul, jnp.diag(jnp.linspace(1.0, 2.0, 30)))

    def run(**kwargs):
        return lanczos(product, jax.random.key(0), 12, dim=30, **kwargs)

    plain = run(recurrence_dtype="float64")
    saved = run(recurrence_dtype="float64", checkpoint=tmp_path / "c", checkpoint_every=5)
    again = run(recurrence_dtype="float64", checkpoint=tmp_path / "c", resume=True)
    for res in (saved, again):
        assert res.tridiag.dtype == np.float64
        np.testing.assert_array_equal(res.tridiag, plain.tridiag)
    with pytest.raises(ValueError, match="different settings"):
        run(checkpoint=tmp_path / "c", resume=True)  # a float32 recurrence


def test_bad_recurrence_dtype():
    f = lambda v: v  # noqa: E731
    with pytest.raises(ValueError, match="float32 or float64"):
        lanczos(f, jax.random.key(0), 2, dim=3, recurrence_dtype="float16")
    with pytest.raises(TypeError, match="recurrence_dtype must be a dtype"):
        lanczos(f, jax.random.key(0), 2, dim=3, recurrence_dtype="double-ish")
    with pytest.raises(ValueError, match="needs jax_enable_x64"):
        jax.jit(lambda k: lanczos(f, k, 2, dim=3, recurrence_dtype="float64").tridiag)(
            jax.random.key(0)
        )


@pytest.mark.parametrize("loop", ["scan", "host"])
def test_a_matvec_of_the_wrong_shape_is_named(loop):
    """It failed with "cond branches must have equal output types"."""
    with pytest.raises(ValueError, match=r"returned shape \(3,\) for a vector of shape \(4,\)"):
        lanczos(lambda v: v[:3], jax.random.key(0), 3, dim=4, loop=loop)


def test_reverse_mode_goes_through_lanczos_under_jit(x64):
    """Under the caller's jit the recurrence is a scan, which jax.grad can differentiate
    (a while loop cannot). At full order trace(T) = trace(V A V^T) = trace(A), so its
    gradient in A is the identity."""
    a0 = jnp.asarray(np.random.default_rng(0).standard_normal((6, 6)))
    a0 = a0 + a0.T

    def trace_of_t(a):
        op = jax.tree_util.Partial(lambda a, v: a @ v, a)
        return jnp.trace(lanczos(op, jax.random.key(0), 6, dim=6).tridiag)

    grad = jax.jit(jax.grad(trace_of_t))(a0)
    np.testing.assert_allclose(grad, np.eye(6), atol=1e-8)


def test_basis_in_host_memory_gives_the_same_run():
    a = jnp.diag(jnp.arange(1.0, 21.0))
    device = lanczos(lambda v: a @ v, jax.random.key(0), 8, dim=20)
    host = lanczos(lambda v: a @ v, jax.random.key(0), 8, dim=20, basis_memory="host")
    assert host.basis.devices() == {jax.devices("cpu")[0]}
    np.testing.assert_allclose(host.tridiag, device.tridiag, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="runs from the host loop"):
        lanczos(lambda v: a @ v, jax.random.key(0), 8, dim=20, basis_memory="host", loop="scan")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with pytest.raises(ValueError, match="cannot be combined with basis_sharding"):
        lanczos(
            lambda v: a @ v,
            jax.random.key(0),
            8,
            dim=20,
            basis_memory="host",
            basis_sharding=sharding,
        )
    with pytest.raises(ValueError, match="basis_memory must be 'device' or 'host'"):
        lanczos(lambda v: a @ v, jax.random.key(0), 8, dim=20, basis_memory="disk")


def test_reorthogonalisation_repeats_when_one_pass_is_not_enough():
    # A vector almost inside the basis's span: one Gram-Schmidt pass leaves a remainder far
    # from orthogonal (its rounding is large against what is left), so the second pass must
    # run; a vector far from the span keeps what one pass gives.
    from jax_spectral.lanczos import _gram_schmidt, _reorthogonalize

    basis = jnp.asarray(np.linalg.qr(np.random.default_rng(0).normal(size=(2000, 30)))[0].T)
    basis = basis.astype(jnp.float32)
    inside = basis.T @ jnp.linspace(1.0, 2.0, 30) + 1e-4 * jnp.ones(2000) / np.sqrt(2000)
    once = _gram_schmidt(basis, inside)
    out = _reorthogonalize(basis, inside)

    def leak(x):
        return float(jnp.max(jnp.abs(basis @ x)) / jnp.linalg.norm(x))

    assert leak(once) > 1e-4  # one pass is not enough here
    assert leak(out) < 1e-6
    far = jnp.asarray(np.random.default_rng(1).normal(size=2000), jnp.float32)
    np.testing.assert_array_equal(_reorthogonalize(basis, far), _gram_schmidt(basis, far))


@pytest.mark.parametrize("spectrum", ["geometric", "clustered", "outliers"])
def test_basis_stays_orthonormal_on_hard_spectra_float32(spectrum):
    # Spectra on which Lanczos without reorthogonalisation loses orthogonality within a few
    # steps; with it the float32 basis stays orthonormal to working precision.
    rng = np.random.default_rng(0)
    eig = {
        "geometric": np.geomspace(1e-6, 1e3, 300),
        "clustered": np.r_[1 + 1e-6 * rng.normal(size=200), np.linspace(50, 100, 100)],
        "outliers": np.r_[rng.normal(size=295), [1e3, 900, 800, 700, 600]],
    }[spectrum]
    q = np.linalg.qr(rng.normal(size=(300, 300)))[0]
    a = jnp.asarray((q * eig) @ q.T, jnp.float32)
    res = lanczos(lambda v: a @ v, jax.random.key(1), 150, dim=300)
    k = int(res.num_steps)
    v = np.asarray(res.basis[:k], np.float64)
    assert k > 60
    np.testing.assert_allclose(v @ v.T, np.eye(k), atol=2e-6)


@pytest.mark.parametrize("many", [False, True], ids=["lanczos", "slq"])
def test_the_result_of_an_eager_run_reuses_the_memory_of_its_bases(many, monkeypatch):
    """An eager run packs its state into the result in place. ``check_fits`` admits bases
    of up to 80% of the free memory; a result written beside them, as before, needed a
    second array of their size and failed after the last step for any bases above 40%
    (measured on a CPU run of order 90 over 3.5M parameters: the process peaked at 2.9 GB
    for 1.28 GB of basis, and at 1.7 GB with the result in place)."""
    import importlib

    module = importlib.import_module("jax_spectral.slq" if many else "jax_spectral.lanczos")
    name = "_pack_many" if many else "_pack_jit"
    pack, seen = getattr(module, name), []

    def spy(state):
        seen.append(state)
        return pack(state)

    monkeypatch.setattr(module, name, spy)
    diagonal = jnp.linspace(1.0, 2.0, 1000)

    class Diagonal:
        dim, dtype, traceable = 1000, np.dtype(np.float32), False
        matvec = staticmethod(lambda v: diagonal * v)

    if many:
        result = js_slq(Diagonal(), jax.random.key(0), 8, num_probes=2).lanczos
    else:
        result = lanczos(lambda v: diagonal * v, jax.random.key(0), 8, dim=1000)
    (state,) = seen
    assert state.basis.is_deleted()  # donated: its memory is the result's
    assert np.all(np.isfinite(np.asarray(result.basis)))
