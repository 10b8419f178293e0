import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import classification_data, init_mlp, mlp_loss
from jax.flatten_util import ravel_pytree

from jax_spectral import full_hessian, hvp


def _dense_reference(params, batch):
    flat, unravel = ravel_pytree(params)
    return jax.hessian(lambda f: mlp_loss(unravel(f), batch))(flat), unravel


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_hvp_matches_dense_hessian(precision):
    def run():
        dtype = jnp.float64 if precision == "float64" else jnp.float32
        params = init_mlp(jax.random.key(0), [5, 7, 3], dtype)
        batch = classification_data(jax.random.key(1), 11, 5, 3, dtype)
        dense, unravel = _dense_reference(params, batch)
        v_flat = jax.random.normal(jax.random.key(2), (dense.shape[0],), dtype)
        got = ravel_pytree(hvp(mlp_loss, params, batch, unravel(v_flat)))[0]
        want = dense @ v_flat
        assert got.dtype == dtype
        rtol = 1e-10 if precision == "float64" else 1e-5
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())

    if precision == "float64":
        with jax.enable_x64(True):
            run()
    else:
        run()


def test_hvp_under_jit_and_vmap_over_v(x64):
    params = init_mlp(jax.random.key(0), [4, 6, 3], jnp.float64)
    batch = classification_data(jax.random.key(1), 9, 4, 3, jnp.float64)
    dense, unravel = _dense_reference(params, batch)
    vs = jax.random.normal(jax.random.key(2), (5, dense.shape[0]), jnp.float64)
    batched = jax.jit(jax.vmap(lambda v: hvp(mlp_loss, params, batch, unravel(v))))(vs)
    got = jax.vmap(lambda t: ravel_pytree(t)[0])(batched)
    np.testing.assert_allclose(got, vs @ dense.T, rtol=1e-10, atol=1e-12)


def test_full_hessian_is_in_ravel_order(x64):
    params = {"b": jnp.array([1.0, 2.0]), "a": jnp.array(3.0)}

    def loss(p, x):
        return p["a"] ** 2 * p["b"][0] + x * p["b"][0] * p["b"][1] ** 2

    h = full_hessian(loss, params, 2.0)
    # ravel_pytree order: a, b[0], b[1] (dict keys sorted).
    a, b0, b1 = 3.0, 1.0, 2.0
    want = np.array(
        [
            [2 * b0, 2 * a, 0.0],
            [2 * a, 0.0, 2 * 2.0 * b1],
            [0.0, 2 * 2.0 * b1, 2 * 2.0 * b0],
        ]
    )
    np.testing.assert_allclose(h, want, rtol=1e-12)


def test_non_scalar_loss_is_rejected():
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="must return a scalar.*shape \\(3,\\)"):
        hvp(lambda p, x: p["w"] * x, params, 1.0, params)
    with pytest.raises(ValueError, match="must return a scalar"):
        full_hessian(lambda p, x: p["w"] * x, params, 1.0)


@pytest.mark.parametrize(
    "leaf, kind",
    [(jnp.ones(2, jnp.int32), "non-floating"), (jnp.ones(2, jnp.complex64), "complex")],
)
def test_integer_and_complex_leaves_are_rejected(leaf, kind):
    params = {"good": jnp.ones(2), "bad": leaf}
    with pytest.raises(TypeError, match=f"\\['bad'\\] has {kind} dtype"):
        hvp(lambda p, x: jnp.sum(p["good"]) * x, params, 1.0, params)
    with pytest.raises(TypeError, match="has .* dtype"):
        full_hessian(lambda p, x: jnp.sum(p["good"]) * x, params, 1.0)


def test_tangent_structure_must_match():
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="same pytree structure"):
        hvp(lambda p, x: jnp.sum(p["w"] ** 2), params, None, {"v": jnp.ones(2)})
