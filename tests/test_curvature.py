"""Gauss-Newton, Fisher, blocks and sums against dense float64 references built from
jax.jacfwd / jax.hessian / per-sample jax.grad (no product code under test)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import classification_data, init_mlp, mlp_apply, mlp_loss
from jax.flatten_util import ravel_pytree

import jax_spectral as js


def dense(operator):
    """The operator's matrix, column by column."""
    eye = jnp.eye(operator.dim, dtype=operator.dtype)
    return np.asarray(js.linop.matmat(operator, eye)).T


def ce(reduce):
    def loss(logits, labels):
        per = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]
        return per.mean() if reduce == "mean" else per.sum()

    return loss


def dense_ggn(model, out_loss, params, x, y):
    """J^T H_L J from jax.jacfwd of the outputs and jax.hessian of the loss in them."""
    flat, unravel = ravel_pytree(params)
    outputs = model(params, x)
    jac = jax.jacfwd(lambda f: model(unravel(f), x))(flat).reshape(outputs.size, -1)
    h_out = jax.hessian(lambda o: out_loss(o, y))(outputs).reshape(outputs.size, outputs.size)
    return np.asarray(jac.T @ h_out @ jac)


@pytest.fixture
def mlp(x64):
    params = init_mlp(jax.random.key(0), [5, 4, 3], jnp.float64)
    x, y = classification_data(jax.random.key(1), 23, 5, 3, jnp.float64)
    return params, jnp.asarray(x), jnp.asarray(y)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("named", [True, False])
def test_ggn_equals_dense_mlp(mlp, reduce, named):
    params, x, y = mlp
    loss = "softmax_cross_entropy" if named else ce(reduce)
    G = js.ggn_operator(mlp_apply, loss, params, (x, y), batch_size=7, reduce=reduce)
    assert G.kind == "ggn" and G.num_samples == 23  # 3 batches of 7 and one of 2
    np.testing.assert_allclose(
        dense(G), dense_ggn(mlp_apply, ce(reduce), params, x, y), atol=1e-12, rtol=1e-10
    )


def test_ggn_mse_equals_dense(mlp):
    params, x, _ = mlp
    targets = jnp.asarray(np.random.default_rng(0).normal(size=(23, 3)))
    G = js.ggn_operator(mlp_apply, "mse", params, (x, targets), batch_size=5)
    reference = dense_ggn(mlp_apply, lambda o, t: jnp.mean((o - t) ** 2), params, x, targets)
    np.testing.assert_allclose(dense(G), reference, atol=1e-12, rtol=1e-10)


def cnn(params, x):
    h = jax.lax.conv_general_dilated(
        x, params["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h = jnp.tanh(h + params["c"])
    return h.reshape(h.shape[0], -1) @ params["w"]


def cnn_setup(dtype):
    ks = jax.random.split(jax.random.key(2), 4)
    params = {
        "k": 0.5 * jax.random.normal(ks[0], (3, 3, 1, 2), dtype),
        "c": jnp.zeros(2, dtype),
        "w": 0.2 * jax.random.normal(ks[1], (6 * 6 * 2, 3), dtype),
    }
    x = jax.random.normal(ks[2], (9, 6, 6, 1), dtype)
    y = jax.random.randint(ks[3], (9,), 0, 3)
    return params, x, y


@pytest.mark.slow  # the MLP case runs in the fast suite; a CNN compiles for 10 s
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_ggn_equals_dense_cnn(x64, reduce):
    params, x, y = cnn_setup(jnp.float64)
    G = js.ggn_operator(cnn, "softmax_cross_entropy", params, (x, y), batch_size=4, reduce=reduce)
    np.testing.assert_allclose(
        dense(G), dense_ggn(cnn, ce(reduce), params, x, y), atol=1e-12, rtol=1e-10
    )


def test_ggn_cnn_float32_through_the_cpu_rewrite():
    params, x, y = cnn_setup(jnp.float32)
    G = js.ggn_operator(cnn, "softmax_cross_entropy", params, (x, y), batch_size=4)
    assert G.rewrite in ("onednn", "patches") if jax.default_backend() == "cpu" else True
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        reference = dense_ggn(cnn, ce("mean"), p64, jnp.asarray(x, jnp.float64), y)
    got = dense(G)
    assert np.abs(got - reference).max() <= 1e-5 * np.abs(reference).max()


def per_sample_gradients(params, x, y):
    def one(xi, yi):
        return ravel_pytree(jax.grad(mlp_loss)(params, (xi[None], yi[None])))[0]

    return np.asarray(jax.vmap(one)(x, y))


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("named", [True, False])
def test_empirical_fisher_equals_per_sample_gradients(mlp, reduce, named):
    params, x, y = mlp
    loss = "softmax_cross_entropy" if named else ce(reduce)
    F = js.fisher_operator(mlp_apply, loss, params, (x, y), batch_size=7, reduce=reduce)
    g = per_sample_gradients(params, x, y)
    reference = g.T @ g / (23 if reduce == "mean" else 1)
    np.testing.assert_allclose(dense(F), reference, atol=1e-12, rtol=1e-10)


def test_mc_fisher_approaches_the_ggn(mlp):
    params, x, y = mlp
    G = dense(js.ggn_operator(mlp_apply, "softmax_cross_entropy", params, (x, y), batch_size=7))

    def error(samples):  # root mean square over keys of the relative Frobenius error
        errors = []
        for seed in range(6):
            F = js.fisher_operator(
                mlp_apply,
                "softmax_cross_entropy",
                params,
                (x, y),
                batch_size=7,
                kind="mc",
                key=jax.random.key(seed),
                mc_samples=samples,
            )
            errors.append(np.linalg.norm(dense(F) - G) / np.linalg.norm(G))
        return float(np.sqrt(np.mean(np.square(errors))))

    one, many = error(1), error(64)
    assert 4 <= one / many <= 16, (one, many)  # sqrt(64) = 8 expected


@pytest.mark.slow
def test_mc_fisher_is_one_matrix_for_any_batching_and_order(mlp):
    params, x, y = mlp
    key = jax.random.key(3)

    def build(data, **kw):
        return dense(
            js.fisher_operator(
                mlp_apply, "mse", params, data, kind="mc", key=key, mc_samples=3, **kw
            )
        )

    targets = jnp.asarray(np.random.default_rng(1).normal(size=(23, 3)))
    reference = build((x, targets), batch_size=7)
    order = np.random.default_rng(2).permutation(23)
    xs, ts = np.asarray(x)[order], np.asarray(targets)[order]
    streamed = lambda: iter([(xs[i : i + 5], ts[i : i + 5]) for i in range(0, 23, 5)])  # noqa: E731
    np.testing.assert_allclose(build(streamed), reference, atol=1e-12, rtol=1e-10)
    other_key = dense(
        js.fisher_operator(
            mlp_apply, "mse", params, (x, targets), kind="mc", key=jax.random.key(4), mc_samples=3
        )
    )
    assert np.abs(other_key - reference).max() > 1e-3  # the key matters


def test_hessian_block_equals_the_dense_sub_block(mlp):
    params, x, y = mlp
    H_full = dense(js.hessian_operator(mlp_loss, params, (x, y), batch_size=7))
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    sizes = [leaf.size for leaf in jax.tree_util.tree_leaves(params)]
    offsets = np.cumsum([0] + sizes)
    for wrt in ("layer1", ["w"], "['layer0']['b']", lambda path, leaf: leaf.ndim == 1):
        H = js.hessian_operator(mlp_loss, params, (x, y), batch_size=7, wrt=wrt)
        chosen = js.operators.select_leaves(params, wrt)
        index = np.concatenate(
            [np.arange(offsets[i], offsets[i + 1]) for i, s in enumerate(chosen) if s]
        )
        assert H.dim == index.size and 0 < index.size < H_full.shape[0], names
        np.testing.assert_allclose(dense(H), H_full[np.ix_(index, index)], atol=1e-12)
    block = js.hessian_operator(mlp_loss, params, (x, y), wrt="layer1")
    tree = block.unravel(jnp.arange(block.dim, dtype=jnp.float64))
    assert tree["layer0"] == {"b": None, "w": None} and tree["layer1"]["w"].shape == (4, 3)
    np.testing.assert_array_equal(
        block.ravel(tree),
        block.ravel(jax.tree_util.tree_map(lambda a: a, {**params, "layer1": tree["layer1"]})),
    )


def test_blocks_per_layer_and_ggn_block(mlp):
    params, x, y = mlp
    blocks = js.layer_blocks(params)
    assert list(blocks) == ["['layer0']", "['layer1']"]
    G_full = dense(js.ggn_operator(mlp_apply, "softmax_cross_entropy", params, (x, y)))
    G1 = js.ggn_operator(
        mlp_apply, "softmax_cross_entropy", params, (x, y), wrt=blocks["['layer1']"]
    )
    n0 = params["layer0"]["w"].size + params["layer0"]["b"].size
    np.testing.assert_allclose(dense(G1), G_full[n0:, n0:], atol=1e-12)


def test_residual_damping_and_scaling(mlp):
    params, x, y = mlp
    H = js.hessian_operator(mlp_loss, params, (x, y), batch_size=7)
    G = js.ggn_operator(mlp_apply, "softmax_cross_entropy", params, (x, y), batch_size=7)
    h, g = dense(H), dense(G)
    flat, unravel = ravel_pytree(params)
    reference = jax.hessian(lambda f: mlp_loss(unravel(f), (x, y)))(flat)
    np.testing.assert_allclose(h, reference, atol=1e-12)
    np.testing.assert_allclose(dense(H - G), h - g, atol=1e-12)
    np.testing.assert_allclose(dense(H + 0.5), h + 0.5 * np.eye(H.dim), atol=1e-12)
    np.testing.assert_allclose(dense(2.0 * G - H), 2 * g - h, atol=1e-12)
    assert (H - G).traceable and js.linop.is_operator(H - G)
    # the residual is a pytree of both operators' arrays: jit takes them as arguments
    assert len(jax.tree_util.tree_leaves(H - G)) == 2 * len(jax.tree_util.tree_leaves(H))


def test_ggn_is_positive_semidefinite():
    params = init_mlp(jax.random.key(5), [6, 8, 4])
    x, y = classification_data(jax.random.key(6), 50, 6, 4)
    G = js.ggn_operator(mlp_apply, "softmax_cross_entropy", params, (x, y), batch_size=16)
    values, _ = js.ritz(js.lanczos(G, jax.random.key(0), G.dim))
    assert values[0] >= -1e-6 * values[-1], values[:3]
    H = js.hessian_operator(mlp_loss, params, (x, y), batch_size=16)
    hv, _ = js.ritz(js.lanczos(H, jax.random.key(0), H.dim))
    assert hv[0] < -1e-4 * hv[-1]  # the Hessian of the same model is indefinite here


@pytest.mark.slow
def test_algorithms_run_unchanged_on_every_operator(mlp):
    params, x, y = mlp
    H = js.hessian_operator(mlp_loss, params, (x, y), batch_size=7)
    G = js.ggn_operator(mlp_apply, "softmax_cross_entropy", params, (x, y), batch_size=7)
    F = js.fisher_operator(mlp_apply, "softmax_cross_entropy", params, (x, y), loop="host")
    B = js.hessian_operator(mlp_loss, params, (x, y), wrt="layer0")
    for op in (G, F, H - G, B, G + 1e-3):
        matrix = dense(op)
        exact = np.linalg.eigvalsh((matrix + matrix.T) / 2)
        pairs = js.eigenpairs(op, jax.random.key(1), k=2, order=op.dim)
        np.testing.assert_allclose(pairs.values, exact[::-1][:2], rtol=1e-8, atol=1e-10)
        result = js.slq(op, jax.random.key(2), num_probes=2, order=op.dim)
        nodes = result.nodes[0][result.weights[0] > 1e-10]  # each a true eigenvalue
        gaps = np.abs(nodes[:, None] - exact[None, :]).min(axis=1)
        assert gaps.max() <= 1e-6 * np.abs(exact).max(), gaps.max()
        assert nodes.max() == pytest.approx(exact[-1], rel=1e-8)
        trace = js.hutchpp(op, jax.random.key(3), num_matvecs=3 * op.dim)
        assert abs(trace.estimate - exact.sum()) <= 1e-6 * np.abs(exact).sum()
        assert js.estimate(op, order=10).basis_bytes == 10 * op.dim * 8


class Minimal:
    """A user operator with only matvec and dim (no dtype, traceable or matmat)."""

    def __init__(self, matrix):
        self.matrix = matrix
        self.dim = matrix.shape[0]

    def matvec(self, v):
        return jnp.asarray(self.matrix, jnp.float32) @ v


def test_a_minimal_user_operator_is_accepted_everywhere():
    matrix = np.diag(np.arange(1.0, 9.0))
    op = Minimal(matrix)
    result = js.lanczos(op, jax.random.key(0), 8, loop="host")
    np.testing.assert_allclose(js.ritz(result)[0], np.arange(1.0, 9.0), rtol=1e-5)
    assert js.eigenpairs(op, jax.random.key(0), k=1, order=8).values[0] == pytest.approx(8, 1e-5)
    assert js.hutchpp(op, jax.random.key(1), num_matvecs=24).estimate == pytest.approx(36, 1e-5)
    assert js.estimate(op, order=4).basis_bytes == 4 * 8 * 4


def test_as_operator_takes_arrays_as_arguments():
    matrix = jnp.asarray(np.diag(np.arange(1.0, 7.0)), jnp.float32)
    op = js.as_operator(lambda v, m: m @ v, matrix, dim=6)
    assert jax.tree_util.tree_leaves(op) == [matrix]
    values, _ = js.ritz(js.lanczos(op, jax.random.key(0), 6))
    np.testing.assert_allclose(values, np.arange(1.0, 7.0), rtol=1e-5)
    from jax_spectral.checkpoint import fingerprint

    other = js.as_operator(lambda v, m: m @ v, 2 * matrix, dim=6)
    assert fingerprint(op) != fingerprint(other)  # the arrays are part of the identity
    with pytest.raises(ValueError, match="dim="):
        js.as_operator(lambda v: v)
    params = {"a": jnp.zeros(2), "b": jnp.zeros((2, 2))}
    shaped = js.as_operator(lambda v: 3 * v, like=params)
    assert shaped.matvec_tree(jax.tree_util.tree_map(jnp.ones_like, params))["b"][0, 0] == 3


def test_bad_input_is_named(mlp):
    params, x, y = mlp
    with pytest.raises(ValueError, match="must return one array"):
        js.ggn_operator(
            lambda p, x: {"logits": mlp_apply(p, x)}, "softmax_cross_entropy", params, (x, y)
        )
    with pytest.raises(ValueError, match="must return a scalar"):
        js.ggn_operator(mlp_apply, lambda o, t: o.sum(axis=1), params, (x, y))
    with pytest.raises(ValueError, match="integer labels"):
        js.ggn_operator(mlp_apply, "softmax_cross_entropy", params, (x, y[:, None]))
    with pytest.raises(ValueError, match="one shape"):
        js.ggn_operator(mlp_apply, "mse", params, (x, y))
    with pytest.raises(ValueError, match="batches \\(inputs, targets\\)"):
        js.ggn_operator(mlp_apply, "mse", params, x)
    with pytest.raises(ValueError, match="selects no parameters.*layer0"):
        js.hessian_operator(mlp_loss, params, (x, y), wrt="conv")
    with pytest.raises(ValueError, match="named loss"):
        js.fisher_operator(mlp_apply, ce("mean"), params, (x, y), kind="mc", key=jax.random.key(0))
    with pytest.raises(ValueError, match="key="):
        js.fisher_operator(mlp_apply, "mse", params, (x, y), kind="mc")
    with pytest.raises(ValueError, match="kind must be"):
        js.fisher_operator(mlp_apply, "mse", params, (x, y), kind="true")
    H = js.hessian_operator(mlp_loss, params, (x, y))
    w0 = js.hessian_operator(mlp_loss, params, (x, y), wrt=lambda p, a: a.size == 3)  # biases
    b1 = js.hessian_operator(mlp_loss, params, (x, y), wrt=["['layer1']['b']", "['layer0']['b']"])
    assert w0.dim == 3 and b1.dim == 7
    with pytest.raises(ValueError, match="different sizes"):
        H + w0
    other = js.hessian_operator(mlp_loss, params, (x, y), wrt="['layer0']['b']")
    swapped = js.hessian_operator(mlp_loss, params, (x, y), wrt="['layer1']['b']")
    assert other.dim == 4 and swapped.dim == 3
    same_size = js.hessian_operator(mlp_loss, params, (x, y), wrt="['layer1']['b']")
    with pytest.raises(ValueError, match="different parameter layouts"):
        w0 - js.as_operator(lambda v: v, like={"q": jnp.zeros(3)})
    assert (swapped - same_size).dim == 3  # one layout: accepted
    with pytest.raises(TypeError, match="real Python numbers"):
        H * H


def test_checkpoints_tell_user_operators_apart(tmp_path):
    matrix = np.diag(np.arange(1.0, 9.0))
    js.lanczos(
        Minimal(matrix),
        jax.random.key(0),
        6,
        loop="host",
        checkpoint=tmp_path / "a",
        checkpoint_every=2,
    )
    with pytest.raises(ValueError, match="operator"):
        js.lanczos(
            Minimal(2 * matrix),
            jax.random.key(0),
            6,
            loop="host",
            checkpoint=tmp_path / "a",
            resume=True,
        )
    again = js.lanczos(
        Minimal(matrix), jax.random.key(0), 6, loop="host", checkpoint=tmp_path / "a", resume=True
    )
    assert int(again.num_steps) == 6


def test_soft_and_multi_hot_targets_in_the_closed_form_ggn(mlp):
    """The closed form scales diag(p) - p p^T by the target row's sum (rows need not sum
    to 1); checked against autodiff of the same loss."""
    params, x, _ = mlp
    targets = jnp.asarray(np.random.default_rng(3).integers(0, 2, (23, 3)) * 0.75)

    def soft_ce(o, t):
        return -jnp.mean(jnp.sum(t * jax.nn.log_softmax(o), axis=-1))

    G = js.ggn_operator(mlp_apply, "softmax_cross_entropy", params, (x, targets), batch_size=5)
    np.testing.assert_allclose(
        dense(G), dense_ggn(mlp_apply, soft_ce, params, x, targets), atol=1e-12, rtol=1e-10
    )


def test_empirical_fisher_of_a_callable_follows_its_own_reduction(mlp):
    """A batch-mean callable with reduce="sum": the sum over batches of each batch's
    mean-loss Fisher, as for its Hessian and GGN (not the per-sample sum)."""
    params, x, y = mlp
    F = js.fisher_operator(mlp_apply, ce("mean"), params, (x, y), batch_size=8, reduce="sum")
    g = per_sample_gradients(params, x, y)
    reference = sum(g[i : i + 8].T @ g[i : i + 8] / len(g[i : i + 8]) for i in range(0, 23, 8))
    np.testing.assert_allclose(dense(F), reference, atol=1e-12, rtol=1e-10)
    summed = js.fisher_operator(mlp_apply, ce("sum"), params, (x, y), batch_size=8, reduce="sum")
    np.testing.assert_allclose(dense(summed), g.T @ g, atol=1e-12, rtol=1e-10)


def test_wrt_names_whole_keys():
    params = {f"Dense_{i}": {"kernel": jnp.ones((2, 2))} for i in (1, 10, 11)}
    chosen = js.operators.select_leaves(params, "Dense_1")
    assert chosen == (True, False, False)
    assert js.operators.select_leaves(params, "['Dense_1']['kernel']") == (True, False, False)
    assert js.operators.select_leaves(params, "kernel") == (True, True, True)
    with pytest.raises(ValueError, match="selects no parameters"):
        js.operators.select_leaves(params, "['Dense_1")  # not the start of ['Dense_10']
    with pytest.raises(TypeError, match="non-empty"):
        js.operators.select_leaves(params, "")


def test_mc_fisher_keys(mlp):
    params, x, _ = mlp
    targets = jnp.zeros((23, 3))
    with pytest.raises(TypeError, match="PRNG key"):
        js.fisher_operator(mlp_apply, "mse", params, (x, targets), kind="mc", key=0)
    rbg = js.fisher_operator(
        mlp_apply, "mse", params, (x, targets), kind="mc", key=jax.random.key(0, impl="rbg")
    )
    assert np.all(np.isfinite(dense(rbg)))
    with pytest.raises(ValueError, match="batches \\(inputs, targets\\)"):
        js.ggn_operator(mlp_apply, "mse", params, (x, targets, jnp.ones(23)))


class Shifted:
    """A user operator holding a matrix and a Python scalar (not a pytree)."""

    def __init__(self, matrix, shift):
        self.matrix, self.shift, self.dim = matrix, shift, matrix.shape[0]

    def matvec(self, v):
        return jnp.asarray(self.matrix, jnp.float32) @ v + self.shift * v


def test_user_operators_are_identified_by_their_content(tmp_path):
    matrix = np.diag(np.arange(1.0, 7.0))
    op = Shifted(matrix, 0.0)
    assert js.ritz(js.lanczos(op, jax.random.key(0), 6))[0][-1] == pytest.approx(6, 1e-5)
    op.shift = 100.0  # changed in place: a new program, not the compiled old one
    assert js.ritz(js.lanczos(op, jax.random.key(0), 6))[0][-1] == pytest.approx(106, 1e-5)
    js.lanczos(
        Shifted(matrix, 0.0), jax.random.key(0), 6, checkpoint=tmp_path / "s", checkpoint_every=2
    )
    with pytest.raises(ValueError, match="operator"):
        js.lanczos(
            Shifted(matrix, 100.0), jax.random.key(0), 6, checkpoint=tmp_path / "s", resume=True
        )
    H = js.as_operator(lambda v, m: m @ v, jnp.asarray(matrix, jnp.float32), dim=6)
    from jax_spectral.checkpoint import fingerprint

    user = Shifted(matrix, 1.0)
    assert fingerprint(js.linop.as_argument(H + user)) != fingerprint(
        js.linop.as_argument(H - 5.0 * (H + user) + 4.0 * H)
    )
    import functools

    def scaled(v, shift=0.0):
        return v * (1.0 + shift)

    a = js.as_operator(functools.partial(scaled, shift=0.0), dim=6)
    b = js.as_operator(functools.partial(scaled, shift=100.0), dim=6)
    assert fingerprint(a) != fingerprint(b)


def test_empirical_fisher_refuses_a_loss_that_is_not_per_sample(mlp):
    params, x, y = mlp
    weights = jnp.linspace(0.5, 2.0, 23)

    def weighted(o, t):  # sample weights: not c * sum_i l_i
        per = -jnp.take_along_axis(jax.nn.log_softmax(o), t[:, None], axis=1)[:, 0]
        return jnp.sum(weights[: len(t)] * per) / jnp.sum(weights[: len(t)])

    with pytest.raises(ValueError, match="not proportional"):
        js.fisher_operator(mlp_apply, weighted, params, (x, y))
    js.ggn_operator(mlp_apply, weighted, params, (x, y))  # the GGN takes any loss


def test_fingerprints_see_constants_library_functions_and_class_data(tmp_path):
    from jax_spectral.checkpoint import fingerprint, object_digest

    A = jnp.eye(4)
    assert fingerprint(lambda v: 2.0 * (A @ v)) != fingerprint(lambda v: 3.0 * (A @ v))
    assert fingerprint(lambda v: jnp.add(v, v)) != fingerprint(lambda v: jnp.subtract(v, v))
    B = np.eye(3)
    assert fingerprint(B.dot) != fingerprint((2 * B).dot)

    def double(v):
        return 2.0 * v

    js.lanczos(
        lambda v: double(A @ v + v),
        jax.random.key(0),
        3,
        dim=4,
        checkpoint=tmp_path / "c",
        checkpoint_every=1,
    )
    with pytest.raises(ValueError, match="operator"):
        js.lanczos(
            lambda v: 3.0 * (A @ v + v),
            jax.random.key(0),
            3,
            dim=4,
            checkpoint=tmp_path / "c",
            resume=True,
        )

    class Scaled:
        scale = 1.0

        def __init__(self, m):
            self.m, self.dim = m, m.shape[0]

        def matvec(self, v):
            return self.scale * (jnp.asarray(self.m, jnp.float32) @ v)

    op = Scaled(np.diag(np.arange(1.0, 5.0)))
    before = object_digest(op)
    assert js.ritz(js.lanczos(op, jax.random.key(0), 4))[0][-1] == pytest.approx(4, 1e-5)
    Scaled.scale = 2.0  # class data: a new program
    assert object_digest(op) != before
    assert js.ritz(js.lanczos(op, jax.random.key(0), 4))[0][-1] == pytest.approx(8, 1e-5)


def test_dataclass_user_operators():
    import dataclasses

    @dataclasses.dataclass
    class Dense:
        m: np.ndarray

        @property
        def dim(self):
            return self.m.shape[0]

        def matvec(self, v):
            return jnp.asarray(self.m, jnp.float32) @ v

    for top in (3.0, 5.0):  # a second instance: its __eq__ compares arrays
        op = Dense(np.diag([1.0, 2.0, top]))
        assert js.ritz(js.lanczos(op, jax.random.key(0), 3))[0][-1] == pytest.approx(top, 1e-5)
