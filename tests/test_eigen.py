import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jax_spectral import hessian_operator
from jax_spectral.eigen import eigenpairs


@pytest.fixture(scope="module")
def digits_problem(digits_dense):
    loss, params, data, dense = digits_dense
    return loss, params, data, np.linalg.eigh(dense)


@pytest.mark.parametrize("which", ["largest", pytest.param("smallest", marks=pytest.mark.slow)])
def test_extreme_eigenpairs_match_dense_eigh(digits_problem, which):
    loss, params, data, (evals, evecs) = digits_problem
    op = hessian_operator(loss, params, data, batch_size=512)
    pairs = eigenpairs(op, jax.random.key(1), 3, which=which, order=300)
    want = evals[::-1][:3] if which == "largest" else evals[:3]
    scale = np.abs(evals).max()
    np.testing.assert_allclose(pairs.values, want, rtol=1e-5, atol=1e-5 * scale)
    # Params-shaped, orthonormal Ritz vectors with small measured residuals.
    flat = jax.vmap(lambda t: ravel_pytree(t)[0])(pairs.vectors)
    assert flat.shape == (3, op.dim)
    np.testing.assert_allclose(flat @ flat.T, np.eye(3), atol=1e-4)
    assert np.all(pairs.converged) and np.all(pairs.residuals < 1e-4 * scale)
    # Each vector is the eigenvector of the dense Hessian, up to sign.
    idx = np.argsort(evals)[::-1][:3] if which == "largest" else np.argsort(evals)[:3]
    overlaps = np.abs(np.sum(np.asarray(flat, np.float64) * evecs[:, idx].T, axis=1))
    np.testing.assert_allclose(overlaps, 1.0, atol=1e-3)


def test_unconverged_pairs_are_flagged():
    a = jnp.diag(jnp.linspace(0.0, 1.0, 500))
    pairs = eigenpairs(lambda v: a @ v, jax.random.key(0), 4, order=6, dim=500)
    assert not np.all(pairs.converged)
    # The residuals are those of the returned pairs, measured here with NumPy in float64,
    # and the flags follow the documented rule (residual <= 1e-4 * max |theta|).
    dense = np.diag(np.linspace(0.0, 1.0, 500))
    vectors = np.asarray(pairs.vectors, np.float64).reshape(4, 500)
    measured = np.linalg.norm(vectors @ dense - pairs.values[:, None] * vectors, axis=1)
    np.testing.assert_allclose(pairs.residuals, measured, rtol=1e-3, atol=1e-6)
    assert np.all(measured > 1e-3)  # six steps cannot resolve a dense spectrum's top
    np.testing.assert_array_equal(pairs.converged, measured <= 1e-4 * np.abs(pairs.values).max())
    assert pairs.values[0] <= 1.0 + 1e-6


def test_errors():
    with pytest.raises(ValueError, match="which must be"):
        eigenpairs(lambda v: v, jax.random.key(0), 1, which="top", dim=3)
    with pytest.raises(ValueError, match="k must be a positive int"):
        eigenpairs(lambda v: v, jax.random.key(0), 0, dim=3)
    with pytest.raises(ValueError, match="invariant subspace after 1 steps"):
        eigenpairs(lambda v: 2 * v, jax.random.key(0), 2, dim=5)


def test_lanczos_options_pass_through_checkpoints_included(tmp_path):
    a = jnp.diag(jnp.arange(1.0, 31.0))
    plain = eigenpairs(lambda v: a @ v, jax.random.key(0), 2, order=12, dim=30)
    folder = tmp_path / "ckpt"
    first = eigenpairs(
        lambda v: a @ v,
        jax.random.key(0),
        2,
        order=12,
        dim=30,
        checkpoint=folder,
        checkpoint_every=4,
    )
    assert any(folder.iterdir())  # the run was saved there
    again = eigenpairs(
        lambda v: a @ v, jax.random.key(0), 2, order=12, dim=30, checkpoint=folder, resume=True
    )
    np.testing.assert_array_equal(first.values, plain.values)
    np.testing.assert_array_equal(again.values, plain.values)
    host = eigenpairs(lambda v: a @ v, jax.random.key(0), 2, order=12, dim=30, basis_memory="host")
    np.testing.assert_allclose(host.values, plain.values, rtol=1e-6)
    with pytest.raises(ValueError, match="basis_memory must be"):
        eigenpairs(lambda v: a @ v, jax.random.key(0), 2, dim=30, basis_memory="disk")
