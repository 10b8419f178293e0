import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import classification_data, counted_batches, init_mlp, mlp_loss
from jax.flatten_util import ravel_pytree

from jax_spectral import hessian_operator
from jax_spectral.trace import hutchinson, hutchpp


def test_hutchinson_is_exact_on_diagonal_matrices():
    d = jnp.linspace(-3.0, 5.0, 40)
    est = hutchinson(lambda v: d * v, jax.random.key(0), num_probes=7, dim=40)
    np.testing.assert_allclose(est.samples, float(d.sum()), rtol=1e-6)
    assert est.estimate == pytest.approx(float(d.sum()), rel=1e-6)
    assert est.stderr == pytest.approx(0.0, abs=1e-5) and est.num_matvecs == 7


def _low_rank_plus_noise(key, n=300, rank=5):
    k1, k2 = jax.random.split(key)
    u = np.linalg.qr(np.asarray(jax.random.normal(k1, (n, rank))))[0]
    noise = np.asarray(jax.random.normal(k2, (n, n))) * 0.02
    a = u @ np.diag(np.linspace(20.0, 50.0, rank)) @ u.T + (noise + noise.T) / 2  # rank < m/3
    return jnp.asarray(a, jnp.float32), float(np.trace(a))


def test_hutchpp_beats_hutchinson_at_equal_matvecs_and_both_cover_the_truth():
    a, true = _low_rank_plus_noise(jax.random.key(0))
    errors_h, errors_pp = [], []
    for seed in range(10):
        key = jax.random.key(100 + seed)
        h = hutchinson(lambda v: a @ v, key, num_probes=30, dim=300)
        pp = hutchpp(lambda v: a @ v, key, num_matvecs=30, dim=300)
        errors_h.append(abs(h.estimate - true))
        errors_pp.append(abs(pp.estimate - true))
        for est in (h, pp):
            assert abs(est.estimate - true) <= 3 * est.stderr
    assert np.mean(errors_pp) < 0.2 * np.mean(errors_h)


@pytest.mark.slow
def test_trace_of_a_dataset_hessian(x64):
    params = init_mlp(jax.random.key(0), [4, 6, 3], jnp.float64)
    batch = classification_data(jax.random.key(1), 30, 4, 3, jnp.float64)
    flat, unravel = ravel_pytree(params)
    true = float(jnp.trace(jax.hessian(lambda f: mlp_loss(unravel(f), batch))(flat)))
    for loop in ("scan", "host"):
        op = hessian_operator(mlp_loss, params, batch, batch_size=8, loop=loop)
        est = hutchinson(op, jax.random.key(2), num_probes=40)
        assert abs(est.estimate - true) <= 3 * est.stderr
        # Hutch++ with as many products as the operator's dimension is exact.
        exact = hutchpp(op, jax.random.key(3), num_matvecs=3 * op.dim)
        assert exact.estimate == pytest.approx(true, rel=1e-8)


def test_errors():
    with pytest.raises(ValueError, match="num_probes must be a positive int"):
        hutchinson(lambda v: v, jax.random.key(0), num_probes=0, dim=3)
    with pytest.raises(ValueError, match="num_matvecs must be an int >= 6"):
        hutchpp(lambda v: v, jax.random.key(0), num_matvecs=5, dim=3)
    with pytest.raises(ValueError, match="give dim="):
        hutchinson(lambda v: v, jax.random.key(0), num_probes=2)
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        hutchinson(lambda v: v * jnp.nan, jax.random.key(0), num_probes=2, dim=3)
    with pytest.raises(TypeError, match="missing 1 required positional argument"):
        hutchinson(lambda v: v, jax.random.key(0), dim=3)


def test_a_function_on_params_shaped_pytrees_with_like():
    """``like=`` as in lanczos: the trace of diag(1..5) acting on a pytree of two leaves."""
    params = {"a": jnp.zeros(2), "b": jnp.zeros(3)}
    scale = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([3.0, 4.0, 5.0])}

    def matvec(tree):
        return jax.tree_util.tree_map(jnp.multiply, scale, tree)

    assert hutchinson(matvec, jax.random.key(0), 4, like=params).estimate == pytest.approx(15)
    # 15 products: the sketch (5) spans the whole space, so Hutch++ is exact
    assert hutchpp(matvec, jax.random.key(0), 15, like=params).estimate == pytest.approx(15)


def test_products_go_through_matmat_in_chunks_with_progress():
    params = init_mlp(jax.random.key(0), [4, 5, 3])
    x, y = classification_data(jax.random.key(1), 20, 4, 3)
    batches, reads = counted_batches(x, y, 8)
    op = hessian_operator(mlp_loss, params, batches)
    dense = np.stack([np.asarray(op.matvec(e)) for e in np.eye(op.dim, dtype=np.float32)])
    seen = []
    reads.clear()
    est = hutchinson(
        op, jax.random.key(2), num_probes=7, chunk=3, progress=lambda *s: seen.append(s[:2])
    )
    assert len(reads) == 3 * 3  # ceil(7 / 3) passes over the three batches
    assert seen == [(3, 7), (6, 7), (7, 7)]
    z = np.asarray(jax.random.rademacher(jax.random.key(2), (7, op.dim), jnp.float32))
    np.testing.assert_allclose(est.samples, np.einsum("ij,jk,ik->i", z, dense, z), rtol=1e-4)
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        hutchpp(op, jax.random.key(0), num_matvecs=9, chunk=0)
