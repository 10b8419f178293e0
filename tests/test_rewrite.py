"""The CPU rewrite (convolutions through oneDNN or as patch matrix products, max pooling as
strided-slice selections) gives XLA's values, gradients and jvp-of-grad HVPs to float32
rounding, and a Hessian operator built with it matches the dense Hessian
(``jacfwd(jacrev)`` of the stock loss) and the stock operator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.flatten_util import ravel_pytree

from jax_spectral import full_hessian, hessian_operator, onednn
from jax_spectral import rewrite as rewrite_module
from jax_spectral.rewrite import cpu_friendly, reshape_max_pool

ONEDNN = pytest.mark.skipif(not onednn.available(), reason="oneDNN is not installed")
# Each rewritten-operator test runs with both kinds of convolution.
BACKENDS = [pytest.param("onednn", marks=ONEDNN), "patches"]

CONVOLUTIONS = {
    "NHWC, VALID": dict(
        x=(4, 9, 9, 3),
        w=(3, 3, 3, 5),
        dn=("NHWC", "HWIO", "NHWC"),
        strides=(1, 1),
        padding="VALID",
        dilation=(1, 1),
    ),
    "strided, SAME": dict(
        x=(4, 9, 9, 3),
        w=(3, 3, 3, 5),
        dn=("NHWC", "HWIO", "NHWC"),
        strides=(2, 1),
        padding="SAME",
        dilation=(1, 1),
    ),
    "NCHW, dilated, uneven pads": dict(
        x=(4, 3, 9, 8),
        w=(5, 3, 3, 2),
        dn=("NCHW", "OIHW", "NCHW"),
        strides=(1, 2),
        padding=((1, 2), (0, 1)),
        dilation=(2, 1),
    ),
    "1-D": dict(
        x=(2, 11, 3),
        w=(4, 3, 6),
        dn=("NWC", "WIO", "NWC"),
        strides=(3,),
        padding="SAME",
        dilation=(1,),
    ),
    "3-D": dict(
        x=(2, 5, 6, 7, 2),
        w=(2, 3, 2, 2, 4),
        dn=("NDHWC", "DHWIO", "NDHWC"),
        strides=(1, 1, 2),
        padding="VALID",
        dilation=(1, 1, 1),
    ),
    "1x1 kernel": dict(
        x=(3, 4, 4, 6),
        w=(1, 1, 6, 2),
        dn=("NHWC", "HWIO", "NHWC"),
        strides=(1, 1),
        padding="VALID",
        dilation=(1, 1),
    ),
}


def _close(actual, expected, rtol=2e-5):
    for a, e in zip(
        jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected), strict=True
    ):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        scale = np.max(np.abs(e))
        assert scale > 0
        np.testing.assert_allclose(a, e, rtol=0, atol=rtol * scale)


def _primitives(fn, *args):
    return {eqn.primitive.name for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns}


def _random(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("case", list(CONVOLUTIONS))
@pytest.mark.parametrize(
    "backend, chunk_bytes",  # patches in one chunk, and one image per chunk
    [pytest.param("onednn", None, marks=ONEDNN), ("patches", None), ("patches", 1)],
)
def test_convolutions_equal_xla_in_value_gradient_and_hvp(case, backend, chunk_bytes, monkeypatch):
    if chunk_bytes is not None:
        monkeypatch.setattr(rewrite_module, "PATCH_BYTES", chunk_bytes)
    use_onednn = backend == "onednn"
    c = CONVOLUTIONS[case]
    x, w = _random(c["x"], 0), _random(c["w"], 1)

    def conv(x, w):
        return jax.lax.conv_general_dilated(
            x, w, c["strides"], c["padding"], rhs_dilation=c["dilation"], dimension_numbers=c["dn"]
        )

    def loss(x, w):
        return jnp.sum(jnp.tanh(conv(x, w)) ** 2)

    fast = cpu_friendly(loss, onednn=use_onednn)
    primitives = _primitives(fast, x, w)
    assert "conv_general_dilated" not in primitives
    assert ("onednn_conv" in primitives) == use_onednn
    _close(cpu_friendly(conv, onednn=use_onednn)(x, w), conv(x, w))
    _close(jax.grad(fast, (0, 1))(x, w), jax.grad(loss, (0, 1))(x, w))

    def hvp(f, tangents):
        return jax.jvp(jax.grad(f, (0, 1)), (x, w), tangents)[1]

    tangents = (_random(c["x"], 2), _random(c["w"], 3))
    _close(jax.jit(hvp, static_argnums=0)(fast, tangents), hvp(loss, tangents))
    many = jax.tree_util.tree_map(lambda t: jnp.stack([t, -2 * t]), tangents)  # under vmap
    _close(jax.vmap(lambda t: hvp(fast, t))(many), jax.vmap(lambda t: hvp(loss, t))(many))


def test_max_pool_equals_reduce_window_and_sends_the_derivative_to_one_element():
    x = _random((2, 7, 9, 3), 0)  # 7 and 9: trailing rows and columns fill no window
    expected = nn.max_pool(x, (2, 3), (2, 3))
    assert jnp.array_equal(reshape_max_pool(x, (1, 2, 3, 1)), expected)
    assert jnp.array_equal(cpu_friendly(lambda x: nn.max_pool(x, (2, 3), (2, 3)))(x), expected)
    g = jax.grad(lambda x: jnp.sum(reshape_max_pool(x, (1, 2, 3, 1)) * 2.0))(x)
    g_xla = jax.grad(lambda x: jnp.sum(nn.max_pool(x, (2, 3), (2, 3)) * 2.0))(x)
    assert jnp.array_equal(g, g_xla)  # no ties in random data: the same element
    tied = jnp.zeros((1, 2, 2, 1))  # a window of equal values: the first gets it all
    g = jax.grad(lambda x: jnp.sum(reshape_max_pool(x, (1, 2, 2, 1))))(tied)
    assert float(g[0, 0, 0, 0]) == 1.0 and int(jnp.sum(g != 0)) == 1
    with_nan = x.at[0, 1, 1, 0].set(jnp.nan)  # a NaN anywhere in a window is its maximum
    pooled = reshape_max_pool(with_nan, (1, 2, 3, 1))
    assert bool(jnp.isnan(pooled[0, 0, 0, 0])) and not bool(jnp.isnan(expected[0, 0, 0, 0]))
    assert jnp.array_equal(jnp.isnan(pooled), jnp.isnan(nn.max_pool(with_nan, (2, 3), (2, 3))))
    big = lambda x: nn.max_pool(x, (4, 5), (4, 5))  # noqa: E731  (20 elements: XLA's)
    assert "reduce_window_max" in _primitives(cpu_friendly(big), x)
    assert "reduce_window_max" not in _primitives(
        cpu_friendly(lambda x: nn.max_pool(x, (4, 4), (4, 4))), x
    )


@pytest.mark.parametrize(
    "shape, window",
    [((2, 7, 9, 3), (1, 2, 3, 1)), ((2, 5, 4, 6, 2), (1, 2, 2, 3, 1)), ((3, 8), (1, 4))],
)
def test_max_pool_second_derivatives_equal_xla_s(shape, window):
    """The HVP (forward over reverse) and the tangent of the pooled values, against
    ``reduce_window``'s own rules, including trailing elements that fill no window, a 3-D
    and a 1-D window, and under vmap; with ties the tangent of the first element wins."""
    x, t = _random(shape, 0), _random(shape, 1)

    def xla_pool(x):
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, window, "VALID")

    def loss(pool):
        return lambda x: jnp.sum(jnp.tanh(pool(x)) ** 2)

    def hvp(f, x, t):
        return jax.jvp(jax.grad(f), (x,), (t,))[1]

    ours, theirs = loss(lambda x: reshape_max_pool(x, window)), loss(xla_pool)
    np.testing.assert_array_equal(hvp(ours, x, t), hvp(theirs, x, t))
    np.testing.assert_array_equal(
        jax.jvp(lambda x: reshape_max_pool(x, window), (x,), (t,))[1],
        jax.jvp(xla_pool, (x,), (t,))[1],
    )
    many = jnp.stack([t, -3 * t])
    np.testing.assert_array_equal(
        jax.vmap(lambda t: hvp(ours, x, t))(many), jax.vmap(lambda t: hvp(theirs, x, t))(many)
    )
    tied = jnp.zeros((1, 2, 2, 1))
    tangent = jnp.arange(1.0, 5.0).reshape(tied.shape)
    _, out = jax.jvp(lambda x: reshape_max_pool(x, (1, 2, 2, 1)), (tied,), (tangent,))
    assert float(out[0, 0, 0, 0]) == 1.0  # the first of four equal elements


def test_what_is_not_rewritten_stays_and_still_agrees():
    x, w = _random((2, 6, 6, 4), 0), _random((3, 3, 2, 4), 1)

    def grouped(x, w):  # depthwise-style: feature_group_count 2
        return jnp.sum(
            jax.lax.conv_general_dilated(
                x,
                w,
                (1, 1),
                "SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=2,
            )
            ** 2
        )

    def transposed(x, w):  # input dilation
        return jnp.sum(
            jax.lax.conv_general_dilated(
                x,
                jnp.tile(w, (1, 1, 2, 1)),
                (1, 1),
                ((1, 1), (1, 1)),
                lhs_dilation=(2, 2),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
            ** 2
        )

    def overlapping_pool(x, w):
        return jnp.sum(nn.max_pool(x, (3, 3), (1, 1)) * w[0, 0, 0, 0])

    for fn, kept in (
        (grouped, "conv_general_dilated"),
        (transposed, "conv_general_dilated"),
        (overlapping_pool, "reduce_window_max"),
    ):
        assert kept in _primitives(cpu_friendly(fn), x, w)
        _close(jax.grad(cpu_friendly(fn), (0, 1))(x, w), jax.grad(fn, (0, 1))(x, w))


def test_integer_pooling_and_empty_results_are_left_to_xla():
    pool = lambda x: jax.lax.reduce_window(  # noqa: E731
        x, np.int8(-128), jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
    )
    x = jnp.asarray(np.random.default_rng(0).integers(-100, 100, (2, 4, 4, 3)), jnp.int8)
    mixed = lambda x: pool(x) + x[:, ::2, ::2]  # noqa: E731  (int8 + int8 stays int8)
    assert cpu_friendly(mixed)(x).dtype == jnp.int8
    assert jnp.array_equal(cpu_friendly(mixed)(x), mixed(x))
    assert "reduce_window_max" in _primitives(cpu_friendly(pool), x)
    half = _random((2, 4, 4, 3), 1).astype(jnp.float16)
    assert cpu_friendly(lambda x: nn.max_pool(x, (2, 2), (2, 2)))(half).dtype == jnp.float16

    def empty(x, w):  # a dilated window larger than the input: XLA gives a (2, 0, 0, 2)
        return jax.lax.conv_general_dilated(
            x, w, (2, 2), "VALID", rhs_dilation=(2, 2), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    x, w = _random((2, 4, 4, 3), 2), _random((3, 3, 3, 2), 3)
    assert cpu_friendly(empty)(x, w).shape == empty(x, w).shape == (2, 0, 0, 2)
    wide = lambda x: nn.max_pool(x, (5, 5), (5, 5))  # noqa: E731  (window over the size)
    assert cpu_friendly(wide)(x).shape == wide(x).shape


def test_chunks_of_several_images(monkeypatch):
    c = CONVOLUTIONS["NHWC, VALID"]  # 7 x 7 outputs, 27 patch columns: 5,292 bytes an image
    x, w = _random((6, 9, 9, 3), 0), _random(c["w"], 1)
    monkeypatch.setattr(rewrite_module, "PATCH_BYTES", 3 * 5292)
    assert rewrite_module._chunk_size(6, 5292) == 3
    assert rewrite_module._chunk_size(7, 5292) == 1  # a prime batch: one image a chunk

    def loss(x, w):
        return jnp.sum(
            jnp.sin(jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=c["dn"]))
        )

    patched = cpu_friendly(loss, onednn=False)
    jaxpr = str(jax.make_jaxpr(patched)(x, w))
    assert "scan" in jaxpr and "f32[3,9,9,3]" in jaxpr  # a loop over two chunks of three
    _close(jax.grad(patched, (0, 1))(x, w), jax.grad(loss, (0, 1))(x, w))


def test_nested_jit_is_inlined_and_the_wrapper_is_cached():
    x, w = _random((2, 5, 5, 3), 0), _random((3, 3, 3, 2), 1)
    conv = jax.jit(
        lambda x, w: jax.lax.conv_general_dilated(
            x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    )

    def loss(x, w):
        return jnp.sum(conv(x, w) ** 2)

    assert cpu_friendly(loss) is cpu_friendly(loss)
    jaxpr = jax.make_jaxpr(cpu_friendly(loss))(x, w)
    assert "conv_general_dilated" not in str(jaxpr)
    _close(cpu_friendly(loss)(x, w), loss(x, w))


class _CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), padding="VALID")(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.tanh(nn.Conv(3, (2, 2), strides=(1, 1), padding="SAME")(x))
        return nn.Dense(3)(x.reshape((x.shape[0], -1)))


def _cnn_problem():
    model = _CNN()
    images = np.random.default_rng(0).standard_normal((10, 8, 8, 2)).astype(np.float32)
    labels = np.random.default_rng(1).integers(0, 3, 10)
    params = model.init(jax.random.key(0), images[:1])["params"]

    def loss(params, batch):
        logits = model.apply({"params": params}, batch[0])
        return jnp.mean(
            jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch[1][:, None], -1)[:, 0]
        )

    return loss, params, (images, labels)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_operator_with_the_rewrite_matches_the_dense_hessian(backend):
    loss, params, data = _cnn_problem()
    op = hessian_operator(loss, params, data, batch_size=4, rewrite=backend)
    stock = hessian_operator(loss, params, data, batch_size=4, rewrite="none")
    assert op.rewrite == backend and op.loop == "scan"  # rewritten: the scanned loop is fast
    dense = np.zeros((op.dim, op.dim))
    for i in range(0, 10, 4):  # the batch-size-weighted mean of batch Hessians
        batch = (data[0][i : i + 4], data[1][i : i + 4])
        dense += len(batch[1]) / 10 * np.asarray(full_hessian(loss, params, batch), np.float64)
    v = np.random.default_rng(2).standard_normal(op.dim).astype(np.float32)
    scale = np.max(np.abs(dense @ v))
    np.testing.assert_allclose(op.matvec(v), dense @ v, atol=2e-5 * scale)
    _close(op.matvec(v), stock.matvec(v))
    _close(op.matmat(np.stack([v, 2 * v])), np.stack([stock.matvec(v), 2 * stock.matvec(v)]))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_host_loop_and_stream_with_the_rewrite(backend):
    loss, params, data = _cnn_problem()
    stock = hessian_operator(loss, params, data, batch_size=4, rewrite="none")
    batches = [(data[0][i : i + 4], data[1][i : i + 4]) for i in range(0, 10, 4)]
    v = np.random.default_rng(3).standard_normal(stock.dim).astype(np.float32)
    expected = stock.matvec(v)
    for op in (
        hessian_operator(loss, params, data, batch_size=4, rewrite=backend, loop="host"),
        hessian_operator(loss, params, lambda: iter(batches), rewrite=backend),
    ):
        assert op.loop == "host" and op.rewrite == backend
        _close(op.matvec(v), expected)


def test_checkpoint_fingerprint_sees_the_rewrite_only_where_it_changes_products():
    from conftest import classification_data, init_mlp, mlp_loss

    from jax_spectral.checkpoint import fingerprint

    params = init_mlp(jax.random.key(0), [4, 5, 3])
    x, y = classification_data(jax.random.key(1), 20, 4, 3)
    settings = ("cpu", "patches", "none")
    mlp = [hessian_operator(mlp_loss, params, (x, y), batch_size=8, rewrite=r) for r in settings]
    assert len({fingerprint(op) for op in mlp}) == 1  # no convolutions: the same products
    loss, params, data = _cnn_problem()
    cnn = [hessian_operator(loss, params, data, batch_size=4, rewrite=r) for r in settings]
    expected = 3 if onednn.available() else 2  # "cpu" is "patches" without oneDNN
    assert len({fingerprint(op) for op in cnn}) == expected


def test_rewrite_setting(monkeypatch):
    from jax_spectral import operators

    loss, params, data = _cnn_problem()
    auto = hessian_operator(loss, params, data, batch_size=4)
    on_cpu = "onednn" if onednn.available() else "patches"
    assert auto.rewrite == (on_cpu if jax.default_backend() == "cpu" else "none")
    assert hessian_operator(loss, params, data, batch_size=4, rewrite="cpu").rewrite == on_cpu
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = hessian_operator(loss, params, data, batch_size=4, rewrite="cpu", mesh=mesh)
    assert sharded.rewrite == "patches"  # a oneDNN call would not be split across devices
    monkeypatch.setattr(operators, "convolutions", lambda: "patches")  # as if not installed
    with pytest.raises(ValueError, match="needs oneDNN"):
        hessian_operator(loss, params, data, rewrite="onednn")
    assert hessian_operator(loss, params, data, batch_size=4, rewrite="cpu").rewrite == "patches"
    monkeypatch.undo()
    assert hessian_operator(loss, params, data, batch_size=4, rewrite="none").loop == (
        "host" if jax.default_backend() == "cpu" else "scan"
    )
    with pytest.raises(ValueError, match="rewrite must be one of"):
        hessian_operator(loss, params, data, rewrite="fast")

    class Unhashable:
        __hash__ = None

        def __call__(self, params, batch):
            return loss(params, batch)

    with pytest.raises(TypeError, match="loss must be hashable"):
        hessian_operator(Unhashable(), params, data)


def test_python_leaves_and_keyword_arguments_reach_the_function_as_given():
    # A Python bool and int beside the arrays: the plain loss branches on them. They used
    # to be traced (TracerBoolConversionError under the default rewrite).
    x = np.random.default_rng(0).standard_normal((6, 7, 7, 3)).astype(np.float32)
    w = {"w": 0.3 * np.random.default_rng(1).standard_normal((3, 3, 3, 2)).astype(np.float32)}

    def loss(p, batch):
        y = jax.lax.conv_general_dilated(
            batch["x"], p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        if batch["train"]:
            y = y * batch["scale"]
        return jnp.mean(jnp.tanh(y) ** 2)

    batch = {"x": x, "train": True, "scale": 2}
    flat, unravel = ravel_pytree(w)
    dense = np.asarray(jax.hessian(lambda z: loss(unravel(z), batch))(flat), np.float64)
    v = np.random.default_rng(2).standard_normal(flat.size).astype(np.float32)
    settings = ("none", "patches", *(("onednn",) if onednn.available() else ()))
    for rewrite in settings:
        for data in ([batch], batch):  # a list of batches, and one batch of arrays
            op = hessian_operator(loss, w, data, rewrite=rewrite)
            np.testing.assert_allclose(op.matvec(v), dense @ v, rtol=1e-4, atol=1e-5)
    frozen = hessian_operator(loss, w, [{**batch, "train": False}])
    assert not np.allclose(frozen.matvec(v), dense @ v, rtol=1e-3)  # the flag is read
    from jax_spectral.checkpoint import fingerprint

    scaled = [hessian_operator(loss, w, [{**batch, "scale": k}]) for k in (2, 3, 2)]
    assert fingerprint(scaled[0]) == fingerprint(scaled[2]) != fingerprint(scaled[1])
    assert fingerprint(frozen) != fingerprint(scaled[0])
    # Batches whose Python values differ: not stacked together (they crashed), and every
    # batch's values count in the fingerprint, not only the first's (a resume across them
    # returned the other run's spectrum).
    half = {"x": x[:3], "train": True}
    dense2 = [
        np.asarray(jax.hessian(lambda z, k=k: loss(unravel(z), {**half, "scale": k}))(flat))
        for k in (2, 3, 5)
    ]
    for data in (
        [{**half, "scale": 2}, {**half, "scale": 3}],
        lambda: iter([{**half, "scale": 2}, {**half, "scale": 3}]),
    ):
        op = hessian_operator(loss, w, data)
        np.testing.assert_allclose(
            op.matvec(v), (dense2[0] + dense2[1]) / 2 @ v, rtol=1e-4, atol=1e-5
        )
        other = data[:1] + [{**half, "scale": 5}] if isinstance(data, list) else None
        if other is None:
            other = lambda: iter([{**half, "scale": 2}, {**half, "scale": 5}])  # noqa: E731
        assert fingerprint(op) != fingerprint(hessian_operator(loss, w, other))

    def keywords(x, *, w, flag):
        y = jax.lax.conv_general_dilated(
            x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.sum(y**2) * (2.0 if flag else 1.0)

    for onednn_on in (True, False):
        rewritten = cpu_friendly(keywords, onednn=onednn_on)
        expected = keywords(x, w=w["w"], flag=True)
        _close(rewritten(x, w=w["w"], flag=True), expected)
        _close(
            jax.grad(rewritten, argnums=0)(x, w=w["w"], flag=False),
            jax.grad(keywords, argnums=0)(x, w=w["w"], flag=False),
        )


def test_the_operator_reports_what_its_rewrite_changed():
    from conftest import classification_data, init_mlp, mlp_loss

    params = init_mlp(jax.random.key(0), [4, 5, 3])
    x, y = classification_data(jax.random.key(1), 20, 4, 3)
    for setting in ("auto", "cpu", "patches", *(("onednn",) if onednn.available() else ())):
        assert hessian_operator(mlp_loss, params, (x, y), rewrite=setting).rewrite == "none"
    loss, params, data = _cnn_problem()
    assert rewrite_module.rewrites(loss, params, (data[0][:4], data[1][:4])) == (
        "onednn" if onednn.available() else "patches"
    )
    assert rewrite_module.rewrites(loss, params, (data[0][:4], data[1][:4]), onednn=False) == (
        "patches"
    )
