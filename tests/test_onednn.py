"""oneDNN's convolution primitives against XLA's convolution: values, the input and kernel
gradients, derivatives of every order (forward-over-reverse, reverse-over-reverse,
forward-over-forward), vmap, lax.scan, and what happens when oneDNN is missing or fails."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_spectral import onednn

pytestmark = pytest.mark.skipif(not onednn.available(), reason="oneDNN is not installed")

# x shape, w shape, strides, explicit padding, kernel dilation; channels last throughout.
GEOMETRIES = {
    "3x3 VALID": ((3, 9, 10, 4), (3, 3, 4, 5), (1, 1), ((0, 0), (0, 0)), (1, 1)),
    "strided, padded, dilated": ((2, 11, 12, 3), (3, 2, 3, 6), (2, 1), ((1, 2), (0, 1)), (1, 2)),
    "1-D": ((2, 13, 3), (4, 3, 2), (3,), ((2, 1),), (1,)),
    "3-D": ((2, 5, 6, 7, 2), (2, 3, 2, 2, 3), (1, 1, 2), ((0, 0), (1, 1), (0, 1)), (1, 1, 1)),
    "1x1": ((3, 4, 4, 6), (1, 1, 6, 2), (1, 1), ((0, 0), (0, 0)), (1, 1)),
    # enough work to split 7 images over XLA's threads in uneven chunks (4 and 3), whose
    # kernel gradients are summed
    "chunked": ((7, 26, 26, 8), (3, 3, 8, 16), (1, 1), ((0, 0), (0, 0)), (1, 1)),
    # stride 1 and 16 or more channels: the kernel gradient as row GEMMs over a grid of
    # the padded input's leading positions and the output's last (padding on both sides,
    # dilation of a leading and of the last dimension, 1-3 spatial dimensions, five tiles
    # over the threads)
    "rows, padded, dilated": ((3, 10, 11, 16), (3, 2, 16, 24), (1, 1), ((1, 2), (1, 1)), (2, 1)),
    "rows, last dilated": ((2, 9, 12, 16), (2, 3, 16, 20), (1, 1), ((1, 0), (2, 3)), (1, 2)),
    "rows, 1-D": ((2, 40, 16), (3, 16, 16), (1,), ((1, 1),), (1,)),
    "rows, 3-D": (
        (2, 6, 7, 5, 16),
        (2, 3, 2, 16, 16),
        (1, 1, 1),
        ((0, 0), (1, 1), (0, 1)),
        (1, 1, 1),
    ),
    "rows, tiles": ((13, 40, 40, 16), (3, 3, 16, 16), (1, 1), ((0, 0), (0, 0)), (1, 1)),
}
ROWS = [case for case in GEOMETRIES if case.startswith("rows")]


def _dimension_numbers(rank):
    spatial = "DHW"[3 - rank :]
    return (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")


def _xla(x, w, strides, padding, dilation):
    return jax.lax.conv_general_dilated(
        x,
        w,
        strides,
        padding,
        rhs_dilation=dilation,
        dimension_numbers=_dimension_numbers(x.ndim - 2),
    )


def _mine(x, w, strides, padding, dilation):
    return onednn.conv(x, w, strides, padding, dilation)


def _random(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _close(actual, expected, rtol=2e-5):
    for a, e in zip(
        jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected), strict=True
    ):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert a.shape == e.shape
        scale = np.max(np.abs(e))
        assert scale > 0
        np.testing.assert_allclose(a, e, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("case", list(GEOMETRIES))
def test_three_kernels_equal_xla(case):
    x_shape, w_shape, *geometry = GEOMETRIES[case]
    x, w = _random(x_shape, 0), _random(w_shape, 1)
    assert onednn.supports(x_shape, w_shape, *geometry, jnp.float32)
    kernel_grad = onednn.implementations(x_shape, w_shape, *geometry).split("kernel_grad: ")[1]
    assert kernel_grad.startswith("rows+") == (case in ROWS)
    expected, pullback = jax.vjp(lambda x, w: _xla(x, w, *geometry), x, w)
    _close(_mine(x, w, *geometry), expected)  # eager
    _close(jax.jit(lambda x, w: _mine(x, w, *geometry))(x, w), expected)
    dy = _random(expected.shape, 2)
    mine_dx, mine_dw = jax.jit(jax.vjp(lambda x, w: _mine(x, w, *geometry), x, w)[1])(dy)
    dx, dw = pullback(dy)
    _close(mine_dx, dx)  # oneDNN's backward_data
    _close(mine_dw, dw)  # oneDNN's backward_weights


@pytest.mark.parametrize("case", ["3x3 VALID", "strided, padded, dilated", "1-D"])
def test_derivatives_of_every_order_equal_xla(case):
    x_shape, w_shape, *geometry = GEOMETRIES[case]
    x, w = _random(x_shape, 0), _random(w_shape, 1)
    tangents = (_random(x_shape, 2), _random(w_shape, 3))

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.tanh(conv(x, w, *geometry)) ** 2)

    def forward_over_reverse(conv):
        return jax.jvp(jax.grad(loss(conv), (0, 1)), (x, w), tangents)[1]

    def reverse_over_reverse(conv):
        inner = jax.grad(loss(conv), (0, 1))
        dot = lambda x, w: sum(  # noqa: E731
            jnp.vdot(g, t) for g, t in zip(inner(x, w), tangents, strict=True)
        )
        return jax.grad(dot, (0, 1))(x, w)

    def forward_over_forward(conv):
        first = lambda x, w: jax.jvp(loss(conv), (x, w), tangents)[1]  # noqa: E731
        return jax.jvp(first, (x, w), tangents)[1]

    for derivative in (forward_over_reverse, reverse_over_reverse, forward_over_forward):
        _close(jax.jit(derivative, static_argnums=0)(_mine), derivative(_xla))


def _vmapped_gradients(conv, axes):
    return jax.vmap(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 3), (0, 1)), axes)


def test_vmap_folds_images_or_loops_and_scan_works():
    x_shape, w_shape, *geometry = GEOMETRIES["strided, padded, dilated"]
    xs = jnp.stack([_random(x_shape, 0), _random(x_shape, 1), _random(x_shape, 2)])
    ws = jnp.stack([_random(w_shape, 3), _random(w_shape, 4), _random(w_shape, 5)])
    mine = lambda x, w: _mine(x, w, *geometry)  # noqa: E731
    xla = lambda x, w: _xla(x, w, *geometry)  # noqa: E731
    for axes, args in (((0, None), (xs, ws[0])), ((None, 0), (xs[0], ws)), ((0, 0), (xs, ws))):
        _close(jax.jit(jax.vmap(mine, axes))(*args), jax.vmap(xla, axes)(*args))
        _close(jax.jit(_vmapped_gradients(mine, axes))(*args), _vmapped_gradients(xla, axes)(*args))
    folded = jax.make_jaxpr(jax.vmap(mine, (0, None)))(xs, ws[0])
    assert "scan" not in str(folded)  # a mapped input alone: the images are folded together
    looped = jax.make_jaxpr(jax.vmap(mine, (None, 0)))(xs[0], ws)
    assert "scan" in str(looped)  # a mapped kernel: one call per kernel

    def summed_gradients(conv):
        def body(total, x):
            g = jax.grad(lambda w: jnp.sum(jnp.sin(conv(x, w))))(ws[0])
            return total + g, None

        return jax.lax.scan(body, jnp.zeros_like(ws[0]), xs)[0]

    _close(jax.jit(summed_gradients, static_argnums=0)(mine), summed_gradients(xla))
    for axes, args in (((0, None), (xs[:0], ws[0])), ((None, 0), (xs[0], ws[:0]))):
        # an empty mapped axis: an empty result, as XLA's rule gives (it divided by zero)
        assert jax.vmap(mine, axes)(*args).shape == jax.vmap(xla, axes)(*args).shape


def test_supports_refuses_what_it_cannot_run():
    base = GEOMETRIES["3x3 VALID"]
    assert onednn.supports(*base, jnp.float32)
    assert not onednn.supports(*base, jnp.float64)
    assert not onednn.supports(*base, jnp.bfloat16)
    x, w, strides, _, dilation = base
    assert not onednn.supports(x, w, strides, ((-1, 0), (0, 0)), dilation, jnp.float32)
    assert not onednn.supports(x, (3, 3, 7, 5), strides, ((0, 0), (0, 0)), dilation, "float32")
    assert not onednn.supports((3, 2, 2, 4), w, strides, ((0, 0), (0, 0)), (1, 1), "float32")
    four_d = ((1, 3, 3, 3, 3, 2), (1, 1, 1, 1, 2, 2), (1,) * 4, ((0, 0),) * 4, (1,) * 4)
    assert not onednn.supports(*four_d, jnp.float32)


def test_conv_refuses_what_it_cannot_run():
    x, w = _random((2, 6, 6, 3), 0), _random((3, 3, 3, 2), 1)
    geometry = ((1, 1), ((0, 0), (0, 0)), (1, 1))
    with pytest.raises(ValueError, match="cannot run this convolution"):
        onednn.conv(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), *geometry)
    with pytest.raises(ValueError, match="cannot run this convolution"):
        onednn.conv(x, w.astype(jnp.bfloat16), *geometry)
    with pytest.raises(ValueError, match="cannot run this convolution"):
        onednn.conv(x, _random((3, 3, 4, 2), 1), *geometry)  # channels disagree
    params = onednn._params(x.shape, w.shape, *geometry)
    with pytest.raises(TypeError, match="float32 operands"):  # the primitive checks too
        jax.eval_shape(lambda x, w: onednn.conv_p.bind(x, w, **params), x, w[:2])


def _run(
    script: str, *args: str, timeout: float = 120, env: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
    )


@pytest.mark.slow
def test_a_process_exits_as_it_would_without_onednn():
    # A daemon thread still running convolutions when the main thread ends, and results
    # dropped before they were computed: with handlers written in Python this process hung
    # past 100 s. Compiled handlers need no interpreter, so it ends as the same process
    # with XLA's convolution does (JAX aborts there, as a thread unwinds at exit); the
    # timeout only catches a hang.
    script = """
        import sys, threading
        import jax, jax.numpy as jnp
        from jax_spectral import onednn
        x, w = jnp.ones((64, 18, 18, 16)), jnp.ones((3, 3, 16, 16))
        if sys.argv[1] == "onednn":
            conv = lambda x, w: onednn.conv(x, w, (1, 1), ((0, 0), (0, 0)), (1, 1))
        else:
            conv = lambda x, w: jax.lax.conv_general_dilated(
                x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        f = jax.jit(lambda x, w: conv(x, w).sum())
        def forever():
            while True:
                f(x, w).block_until_ready()
        threading.Thread(target=forever, daemon=True).start()
        for _ in range(30):
            f(x, w)
        raise SystemExit("stopped with work in flight")
        """
    mine, xla = (_run(script, which, timeout=60) for which in ("onednn", "xla"))
    assert "stopped with work in flight" in mine.stderr, mine.stderr
    assert mine.returncode == xla.returncode, (mine.stderr, xla.stderr)


def test_a_failing_kernel_raises_with_its_reason():
    # Operands whose shapes disagree with the geometry reach the compiled handler only
    # through a raw ffi_call (the primitives check shapes first): it refuses them with an
    # error that JAX raises, where the Python handlers wrote NaN.
    x, w = _random((2, 6, 6, 3), 0), _random((3, 3, 3, 2), 1)
    wrong = jax.ShapeDtypeStruct((2, 5, 5, 2), jnp.float32)  # VALID 3x3 gives (2, 4, 4, 2)
    attributes = dict(
        strides=np.array([1, 1], np.int64),
        low=np.array([0, 0], np.int64),
        high=np.array([0, 0], np.int64),
        dilation=np.array([1, 1], np.int64),
    )
    call = jax.ffi.ffi_call("jax_spectral_onednn_forward", wrong)
    with pytest.raises(Exception, match="output's spatial shape is not the convolution's"):
        np.asarray(jax.jit(lambda x, w: call(x, w, **attributes))(x, w))
    bad = {**attributes, "strides": np.array([0, 1], np.int64)}
    right = jax.ShapeDtypeStruct((2, 4, 4, 2), jnp.float32)
    call = jax.ffi.ffi_call("jax_spectral_onednn_forward", right)
    with pytest.raises(Exception, match="strides and dilation must be positive"):
        np.asarray(jax.jit(lambda x, w: call(x, w, **bad))(x, w))


@pytest.mark.slow
def test_openmp_threads_instead_of_xla_s_pool_give_the_same_kernels():
    script = """
        import jax, jax.numpy as jnp, numpy as np
        from jax_spectral import onednn
        geometry = ((1, 1), ((1, 0), (0, 1)), (1, 1))
        mine = lambda x, w: jnp.sum(jnp.tanh(onednn.conv(x, w, *geometry)) ** 2)
        xla = lambda x, w: jnp.sum(jnp.tanh(jax.lax.conv_general_dilated(
            x, w, (1, 1), geometry[1], dimension_numbers=("NHWC", "HWIO", "NHWC"))) ** 2)
        for c in (8, 16):  # oneDNN's kernel gradient, and row GEMMs
            x = jnp.asarray(np.random.default_rng(0).standard_normal((7, 26, 26, c)), jnp.float32)
            w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, c, 16)), jnp.float32)
            for a, b in zip(jax.jit(jax.grad(mine, (0, 1)))(x, w), jax.grad(xla, (0, 1))(x, w)):
                assert np.max(np.abs(a - b)) <= 2e-5 * np.max(np.abs(b)), np.max(np.abs(a - b))
        print("same")
        """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "JAX_SPECTRAL_ONEDNN_THREADS": "openmp"},
    )
    assert done.returncode == 0 and done.stdout.strip() == "same", done.stderr


def _usable_cores() -> int:
    """The cores this process may run on (its affinity; all of them where that is unknown)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@pytest.mark.slow
@pytest.mark.skipif(_usable_cores() < 2, reason="one core: OpenMP starts no threads")
@pytest.mark.parametrize("threads", ["xla", "openmp"])
def test_the_kernels_start_no_threads_beside_xla_s_pool(threads):
    # oneDNN fixes a primitive's thread count when it builds it: primitives built for all
    # cores and run on each of XLA's threads started an OpenMP team per thread (4 busy
    # threads on 2 cores). The process's threads are counted around the first run of a
    # compiled gradient whose convolutions split over XLA's threads. With
    # JAX_SPECTRAL_ONEDNN_THREADS=openmp oneDNN's own threads do the work: the control
    # that shows the count sees them.
    done = _run(
        """
        import os, sys
        import jax, jax.numpy as jnp
        from jax_spectral import onednn
        def threads():
            return len(os.listdir(f"/proc/{os.getpid()}/task"))
        a = jnp.ones((300, 300))  # XLA's own threads start here
        jax.block_until_ready(jax.jit(lambda a: jnp.cumsum(jnp.sin(a) @ a, axis=0))(a))
        x, w = jnp.ones((64, 18, 18, 16)), jnp.ones((3, 3, 16, 16))
        conv = lambda x, w: onednn.conv(x, w, (1, 1), ((0, 0), (0, 0)), (1, 1))
        grad = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))
        compiled = grad.lower(x, w).compile()
        before = threads()
        jax.block_until_ready(compiled(x, w))
        print("new threads", threads() - before)
        """,
        # OpenMP as wide as the cores this process may use, whatever the caller's setting
        env={
            "JAX_SPECTRAL_ONEDNN_THREADS": threads,
            "OMP_NUM_THREADS": str(_usable_cores()),
        },
    )
    assert done.returncode == 0, done.stderr
    started = int(done.stdout.split("new threads")[-1])
    if threads == "xla":
        assert started == 0, done.stdout
    else:
        assert started > 0, done.stdout


@pytest.mark.slow
def test_a_forked_child_computes_with_the_kernels():
    # The parent loaded and registered the kernels (and computed nothing: JAX itself hangs
    # in a child forked after it has computed, and warns so); the child's convolution and
    # its gradient match XLA's.
    done = _run(
        """
        import os
        import jax, jax.numpy as jnp, numpy as np
        from jax_spectral import onednn
        assert onednn.available()
        pid = os.fork()
        if pid == 0:
            x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8, 8, 3)), jnp.float32)
            w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 3, 5)), jnp.float32)
            mine = lambda w: (onednn.conv(x, w, (1, 1), ((1, 1), (1, 1)), (1, 1)) ** 2).sum()
            xla = lambda w: (jax.lax.conv_general_dilated(
                x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
            ) ** 2).sum()
            ok = np.allclose(jax.grad(mine)(w), jax.grad(xla)(w), rtol=1e-4, atol=1e-3)
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
        """,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("child 0"), done.stdout + done.stderr


@pytest.mark.slow
def test_a_second_process_reuses_the_compiled_program_from_the_persistent_cache(tmp_path):
    # The kernels' targets have fixed names and take the geometry as attributes, so a
    # program compiled by one process runs in the next from JAX's persistent cache.
    script = """
        import logging, sys
        import jax, jax.numpy as jnp, numpy as np
        from jax_spectral import onednn
        from jax_spectral.cli import use_compilation_cache
        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("jax._src.compiler").setLevel(logging.DEBUG)
        use_compilation_cache(sys.argv[1])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # a small program
        x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 12, 12, 4)), jnp.float32)
        w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 4, 6)), jnp.float32)
        loss = lambda w: jnp.sum(onednn.conv(x, w, (1, 1), ((1, 1), (1, 1)), (1, 1)) ** 2)
        hvp = jax.jit(lambda w, v: jax.jvp(jax.grad(loss), (w,), (v,))[1])
        print(float(jnp.sum(hvp(w, w))))
        """
    first, second = (_run(script, str(tmp_path)) for _ in range(2))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout
    hit = "persistent compilation cache hit for 'jit__lambda'"
    assert hit not in first.stderr.lower()
    assert hit in second.stderr.lower(), second.stderr[-2000:]


def test_the_primitive_cache_stays_within_its_bound():
    kernels = onednn._kernels()
    _, bound = kernels.cached()
    geometry = ((1, 1), ((0, 0), (0, 0)), (1, 1))
    for size in range(3, 3 + bound // 3 + 2):  # three kernels each: past the bound
        assert onednn.supports((1, size, 3, 1), (1, 1, 1, 1), *geometry, jnp.float32)
    assert kernels.cached()[0] <= bound
    # a geometry whose primitives were evicted is built again, and still right
    x, w = _random((2, 4, 5, 1), 2), _random((1, 1, 1, 1), 3)
    _close(_mine(x, w, *geometry), _xla(x, w, *geometry))


def test_turned_off_by_the_environment_the_rewrite_uses_patches():
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from jax_spectral import hessian_operator, onednn
        from jax_spectral.rewrite import convolutions, cpu_friendly
        assert not onednn.available() and convolutions() == "patches"
        x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 6, 3)), jnp.float32)
        w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 3, 2)), jnp.float32)
        conv = lambda x, w: jax.lax.conv_general_dilated(
            x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        jaxpr = str(jax.make_jaxpr(cpu_friendly(conv))(x, w))
        assert "onednn" not in jaxpr and "conv_general_dilated" not in jaxpr
        np.testing.assert_allclose(cpu_friendly(conv)(x, w), conv(x, w), atol=1e-5)
        loss = lambda w, batch: jnp.sum(conv(batch, w) ** 2)
        assert hessian_operator(loss, w, x, rewrite="cpu").rewrite == "patches"
        print("ok")
        """
    )
    env = {**os.environ, "JAX_SPECTRAL_ONEDNN": "0", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")
