"""Operators with each batch's product linearised once (CurvatureOperator.linearized), the
form Lanczos and SLQ run: against dense float64 references from jax.hessian / jax.jacfwd /
per-sample jax.grad, none of which goes through the product code."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import classification_data, init_mlp, mlp_apply, mlp_loss
from jax.flatten_util import ravel_pytree

import jax_spectral as js
from jax_spectral import costs

N, BATCH = 23, 5  # four full batches and a ragged one of three
BIG = 2**40


@pytest.fixture
def mlp(x64):
    params = init_mlp(jax.random.key(0), [5, 4, 3], jnp.float64)
    x, y = classification_data(jax.random.key(1), N, 5, 3, jnp.float64)
    return params, jnp.asarray(x), jnp.asarray(y)


def dense(operator, chunk=None):
    eye = jnp.eye(operator.dim, dtype=operator.dtype)
    if chunk is None:
        return np.asarray(
            jax.vmap(operator.matvec)(eye)
            if operator.traceable
            else np.stack([operator.matvec(e) for e in eye])
        ).T
    return np.asarray(operator.matmat(eye, chunk=chunk)).T


def dense_hessian(params, x, y, reduce):
    flat, unravel = ravel_pytree(params)
    if reduce == "mean":
        return np.asarray(jax.hessian(lambda f: mlp_loss(unravel(f), (x, y)))(flat))
    parts = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, N, BATCH)]
    return sum(np.asarray(jax.hessian(lambda f, b=b: mlp_loss(unravel(f), b))(flat)) for b in parts)


@pytest.mark.parametrize("loop", ["scan", "host"])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_linearized_hessian_equals_dense(mlp, loop, reduce):
    params, x, y = mlp
    op = js.hessian_operator(mlp_loss, params, (x, y), batch_size=BATCH, reduce=reduce, loop=loop)
    lin = op.linearized(budget=BIG)
    assert op.linear is None and lin.linear is not None and lin.loop == loop
    reference = dense_hessian(params, x, y, reduce)
    np.testing.assert_allclose(dense(lin), reference, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dense(lin, chunk=3), reference, rtol=1e-10, atol=1e-12)
    assert lin.linearized() is lin  # already linearised
    kept = sum(a.nbytes for a in jax.tree_util.tree_leaves(lin.linear))
    assert op.linearized_bytes() == lin.linearized_bytes() == kept > 0


def test_linearized_block_ggn_and_fisher_equal_dense(mlp):
    params, x, y = mlp
    flat, unravel = ravel_pytree(params)
    n_first = ravel_pytree(params["layer0"])[0].size  # the first layer's leaves come first

    # a block: the first layer's rows and columns of the dense Hessian
    op = js.hessian_operator(mlp_loss, params, (x, y), batch_size=BATCH, wrt="layer0")
    assert op.dim == n_first
    reference = dense_hessian(params, x, y, "mean")[:n_first, :n_first]
    np.testing.assert_allclose(dense(op.linearized(budget=BIG)), reference, rtol=1e-10, atol=1e-12)

    # the generalised Gauss-Newton J^T H_L J
    outputs = mlp_apply(params, x)
    jac = jax.jacfwd(lambda f: mlp_apply(unravel(f), x))(flat).reshape(outputs.size, -1)

    def ce(o):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(o), y[:, None], axis=1))

    h_out = jax.hessian(ce)(outputs).reshape(outputs.size, outputs.size)
    G = js.ggn_operator(mlp_apply, "softmax_cross_entropy", params, (x, y), batch_size=BATCH)
    np.testing.assert_allclose(
        dense(G.linearized(budget=BIG)), np.asarray(jac.T @ h_out @ jac), rtol=1e-10, atol=1e-12
    )

    # the empirical Fisher: per-sample gradients' outer products
    def one(xi, yi):
        return ravel_pytree(jax.grad(mlp_loss)(params, (xi[None], yi[None])))[0]

    g = np.asarray(jax.vmap(one)(x, y))
    F = js.fisher_operator(mlp_apply, "softmax_cross_entropy", params, (x, y), batch_size=BATCH)
    np.testing.assert_allclose(dense(F.linearized(budget=BIG)), g.T @ g / N, rtol=1e-10, atol=1e-12)


def test_linearized_is_skipped_where_it_does_not_fit_or_apply(mlp):
    params, x, y = mlp
    op = js.hessian_operator(mlp_loss, params, (x, y), batch_size=BATCH)
    assert op.linearized(budget=op.linearized_bytes() - 1) is op
    assert op.linearized(budget=op.linearized_bytes()).linear is not None
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 20, 4)] + [(x[20:], y[20:])]
    stream = js.hessian_operator(mlp_loss, params, lambda: iter(batches))
    assert stream.stream is not None
    assert stream.linearized(budget=BIG) is stream and stream.linearized_bytes() is None


def test_lanczos_and_slq_run_the_linearized_operator(mlp, monkeypatch):
    """The drivers linearise once per run, and the run equals the dense Hessian's."""
    params, x, y = mlp
    seen = []
    original = costs.prepared

    def spy(operand, cost, on_host=False):
        out = original(operand, cost, on_host)
        seen.append(getattr(out, "linear", None) is not None)
        return out

    monkeypatch.setattr(costs, "prepared", spy)
    monkeypatch.setattr(sys.modules["jax_spectral.slq"], "prepared", spy)
    reference = np.linalg.eigvalsh(dense_hessian(params, x, y, "mean"))
    for loop in ("scan", "host"):
        op = js.hessian_operator(mlp_loss, params, (x, y), batch_size=BATCH, loop=loop)
        result = js.lanczos(op, jax.random.key(0), op.dim)
        got = np.linalg.eigvalsh(np.asarray(result.tridiag)[: result.num_steps, : result.num_steps])
        np.testing.assert_allclose(got[[0, -1]], reference[[0, -1]], atol=1e-9)
    op = js.hessian_operator(mlp_loss, params, (x, y), batch_size=BATCH)
    result = js.slq(op, jax.random.key(1), op.dim, num_probes=2)
    for nodes, steps in zip(result.nodes, result.lanczos.num_steps, strict=True):
        np.testing.assert_allclose(nodes[[0, steps - 1]], reference[[0, -1]], atol=1e-9)
    assert seen == [True, True, True]


def test_a_non_finite_loss_in_a_linearized_batch_still_raises(mlp):
    params, x, y = mlp
    x = x.at[7, 0].set(jnp.nan)  # the second batch
    op = js.hessian_operator(mlp_loss, params, (x, y), batch_size=BATCH)
    assert np.all(np.isnan(op.linearized(budget=BIG).matvec(jnp.ones(op.dim))))
    with pytest.raises(js.NonFiniteError):
        js.lanczos(op, jax.random.key(0), 5)


def test_a_users_own_linearized_method_is_not_called():
    """A user's operator with a method of that name (here: the Jacobian at another point)
    ran lanczos and slq on what it returned: a silently wrong spectrum."""
    import dataclasses
    import functools

    @functools.partial(jax.tree_util.register_dataclass, data_fields=["a", "at"], meta_fields=[])
    @dataclasses.dataclass
    class Jacobian:
        a: jax.Array
        at: jax.Array

        @property
        def dim(self):
            return self.a.shape[0]

        @property
        def dtype(self):
            return self.a.dtype

        def matvec(self, v):
            return self.a @ v + 3 * self.at**2 * v

        def linearized(self, at=None, **options):  # another meaning of the name
            return Jacobian(self.a, jnp.zeros_like(self.at) if at is None else at)

    a, at = jnp.diag(jnp.arange(1.0, 5.0)), jnp.full(4, 2.0)
    exact = np.linalg.eigvalsh(np.diag(np.arange(1.0, 5.0) + 12.0))
    op = Jacobian(a, at)
    result = js.lanczos(op, jax.random.key(0), 4)
    np.testing.assert_allclose(np.linalg.eigvalsh(np.asarray(result.tridiag)), exact, rtol=1e-5)
    nodes = js.slq(op, jax.random.key(0), 4, num_probes=1).nodes[0]
    np.testing.assert_allclose(np.sort(nodes), exact, rtol=1e-5)
    deflated = js.deflate(op, np.eye(4)[:1])
    assert deflated.linearized() is deflated


def _relu_cnn_loss(params, batch):
    x, y = batch
    h = jax.lax.conv_general_dilated(
        x, params["conv"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h = jax.nn.relu(h)
    h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    logits = jax.nn.relu(h.reshape(h.shape[0], -1) @ params["dense"]) @ params["out"]
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0])


def test_a_linearisation_keeps_no_arrays_of_constants(x64):
    """ReLU's and max pooling's derivative rules fill arrays with zeros (``jnp.where(x > 0,
    g, 0)``); a linearisation used to keep them, as big as the activations (on the CIFAR
    CNN 192 of its 355 MB). Now it keeps the scalar and the products rebuild the array, so
    every floating-point array it keeps (beyond one scalar per batch) holds more than one
    value; its products still equal the dense float64 Hessian."""
    keys = jax.random.split(jax.random.key(0), 5)
    params = {
        "conv": jax.random.normal(keys[0], (3, 3, 2, 2), jnp.float64) * 0.5,
        "dense": jax.random.normal(keys[1], (8, 4), jnp.float64) * 0.5,
        "out": jax.random.normal(keys[2], (4, 3), jnp.float64) * 0.5,
    }
    x = jax.random.normal(keys[3], (8, 6, 6, 2), jnp.float64)
    y = jax.random.randint(keys[4], (8,), 0, 3)
    op = js.hessian_operator(_relu_cnn_loss, params, (x, y), batch_size=4)
    lin = op.linearized(budget=BIG)
    kept = [np.asarray(a) for a in jax.tree_util.tree_leaves(lin.linear)]
    # arrays over the two stacked batches (leading axis); a scalar per batch may repeat
    constant = [
        a.shape for a in kept if a.ndim > 1 and a.dtype.kind == "f" and np.all(a == a.flat[0])
    ]
    assert not constant, f"arrays of one repeated value kept: {constant}"
    flat, unravel = ravel_pytree(params)
    reference = jax.jit(jax.hessian(lambda f: _relu_cnn_loss(unravel(f), (x, y))))(flat)
    np.testing.assert_allclose(dense(lin), np.asarray(reference), rtol=1e-9, atol=1e-12)


def test_a_loss_s_own_remat_still_saves_memory_once_linearised():
    """A loss that wraps its layers in ``jax.checkpoint`` keeps less than the same loss
    without it. The linearisation's own checkpoint (which rebuilds broadcasts) would
    override the loss's and keep 2.5 times more here; it is used only where it keeps less."""
    keys = jax.random.split(jax.random.key(0), 7)
    x = jax.random.normal(keys[0], (64, 16))
    y = jax.random.randint(keys[1], (64,), 0, 10)
    sizes = [16, 64, 64, 64, 10]
    params = [
        jax.random.normal(k, (a, b)) / 8
        for k, a, b in zip(keys[2:6], sizes[:-1], sizes[1:], strict=True)
    ]

    def loss(params, batch, remat):
        h = batch[0]
        for w in params[:-1]:
            layer = lambda w, h: jnp.tanh(h @ w)  # noqa: E731
            h = (jax.checkpoint(layer) if remat else layer)(w, h)
        z = h @ params[-1]
        return jnp.mean(
            jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, batch[1][:, None], 1)[:, 0]
        )

    kept = {}
    for remat in (False, True):
        op = js.hessian_operator(lambda p, b, r=remat: loss(p, b, r), params, (x, y), batch_size=32)
        lin = op.linearized(budget=BIG)
        kept[remat] = lin.linearized_bytes()
        v = jax.random.normal(keys[-1], (op.dim,))
        np.testing.assert_allclose(lin.matvec(v), op.matvec(v), rtol=1e-4, atol=1e-6)
    assert kept[True] < kept[False], kept
