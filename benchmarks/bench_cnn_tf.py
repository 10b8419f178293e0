"""The original package's CIFAR CNN in JAX and in TensorFlow: gradient, HVP and Lanczos.

Run by hand (TensorFlow needed for the TF rows:  pip install -e ".[tfds]"):

    python benchmarks/bench_cnn_tf.py                # 128 images, Lanczos of order 10
    python benchmarks/bench_cnn_tf.py --order 20 --repeats 7

One batch of 128 synthetic 32x32x3 images; the model (conv64, conv64, maxpool, conv128,
conv128, maxpool, dense1024, dense10; 'VALID' 3x3 convolutions; 3,548,234 parameters) is
the Flax ``CifarCNN`` of ``bench_core.py``; TensorFlow runs the same layers with
``tf.nn`` ops on the same weights and data, under ``tf.function``. Rows:

* gradient pass: the gradient of the mean cross-entropy;
* HVP pass: JAX's ``hessian_operator(...).matvec`` as written (``rewrite="none"``), with
  the CPU rewrite's patch products (``rewrite="patches"``) and with its oneDNN
  convolutions (``rewrite="onednn"``, the CPU default where oneDNN is installed);
  TensorFlow's nested ``GradientTape`` HVP (reverse-over-reverse, as the original package
  computes it) and a forward-over-reverse HVP with ``tf.autodiff.ForwardAccumulator``;
* the linearised product, as ``lanczos`` and ``slq`` run it: the batch's product
  linearised once (``CurvatureOperator.linearized``: the loss's forward and backward
  passes, which do not depend on the vector), then one product on it; and the
  linearisation itself, which a run pays once;
* first calls: the HVP's and the Lanczos run's first call, compilation included, and
  TensorFlow's first nested-tape HVP, tracing included;
* the call overhead of oneDNN's compiled kernel: a tiny convolution inside ``lax.scan``,
  against XLA's own, idle and beside a busy Python thread;
* the three convolution kernels alone on the CNN's two larger geometries: oneDNN's
  compiled kernels against TensorFlow's own convolution ops;
* Lanczos of ``--order`` steps: ``jax_spectral.lanczos`` on the default operator, and the
  original package's TensorFlow Lanczos (the nested-tape HVP in float32, the recurrence in
  float64 NumPy with full reorthogonalisation), its HVP traced once (the original retraced
  it every step, so this baseline is faster than the original).

Times are medians of ``--repeats`` calls after a warm-up (Lanczos: of ``--rounds``,
alternating JAX and TF). Each ``matvec`` call from Python is one XLA execution, which maps
fresh memory for its buffers (about 50,000 page faults per pass here; setting
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` makes them 100x fewer); inside one compiled
loop the buffers are reused: the row "a pass in a loop of 10" times ten different vectors
through one ``lax.map`` of the plain ``matvec`` and divides by ten (XLA moves part of the
vector-independent work out of that loop). The HVPs
of the implementations are compared with each other (relative max difference), which also
checks that the two models are the same.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import _time, cifar_problem  # noqa: E402

from jax_spectral import hessian_operator, lanczos, onednn  # noqa: E402
from jax_spectral.rewrite import cpu_friendly  # noqa: E402

LOOP_PASSES = 10  # HVP passes in one compiled loop (lax.map), the way Lanczos runs them


def _tf_model(params):
    """The CNN in TensorFlow ops with the Flax weights; returns (variables, loss(x, y))."""
    import tensorflow as tf

    names = ["Conv_0", "Conv_1", "Conv_2", "Conv_3", "Dense_0", "Dense_1"]
    variables = []
    for name in names:
        variables += [
            tf.Variable(np.asarray(params[name]["kernel"])),
            tf.Variable(np.asarray(params[name]["bias"])),
        ]

    def logits(x):
        h = x
        for i in range(4):
            kernel, bias = variables[2 * i], variables[2 * i + 1]
            h = tf.nn.relu(tf.nn.conv2d(h, kernel, 1, "VALID") + bias)
            if i in (1, 3):
                h = tf.nn.max_pool2d(h, 2, 2, "VALID")
        h = tf.reshape(h, (h.shape[0], -1))
        h = tf.nn.relu(h @ variables[8] + variables[9])
        return h @ variables[10] + variables[11]

    def loss(x, y):
        return tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits(x))
        )

    return variables, loss


def _tf_functions(variables, loss, x, y):
    import tensorflow as tf

    @tf.function
    def grad():
        with tf.GradientTape() as tape:
            value = loss(x, y)
        return tape.gradient(value, variables)

    @tf.function
    def hvp_nested(v):  # the original package: grad of <grad, v>
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                value = loss(x, y)
            grads = inner.gradient(value, variables)
            dot = tf.add_n([tf.reduce_sum(g * t) for g, t in zip(grads, v, strict=True)])
        return outer.gradient(dot, variables)

    @tf.function
    def hvp_forward(v):  # forward-over-reverse
        with tf.autodiff.ForwardAccumulator(variables, v) as acc:
            with tf.GradientTape() as tape:
                value = loss(x, y)
            grads = tape.gradient(value, variables)
        return acc.jvp(grads)

    return grad, hvp_nested, hvp_forward


def _tf_lanczos(hvp, shapes, order, seed):
    """The original package's Lanczos: float32 HVPs, float64 NumPy recurrence."""
    import tensorflow as tf

    sizes = [int(np.prod(s)) for s in shapes]
    dim = sum(sizes)
    rng = np.random.default_rng(seed)
    v = rng.uniform(-1, 1, dim)
    v /= np.linalg.norm(v)
    basis = np.zeros((order, dim))
    tridiag = np.zeros((order, order))
    beta, previous = 0.0, np.zeros(dim)
    for i in range(order):
        basis[i] = v
        parts = np.split(v.astype(np.float32), np.cumsum(sizes)[:-1])
        tangent = [tf.constant(p.reshape(s)) for p, s in zip(parts, shapes, strict=True)]
        w = np.concatenate([np.asarray(t).ravel() for t in hvp(tangent)]).astype(np.float64)
        w -= beta * previous
        alpha = w @ v
        w -= alpha * v
        w -= basis[: i + 1].T @ (basis[: i + 1] @ w)  # full reorthogonalisation
        tridiag[i, i] = alpha
        beta = np.linalg.norm(w)
        if i + 1 < order:
            tridiag[i, i + 1] = tridiag[i + 1, i] = beta
        previous, v = v, w / beta
    return tridiag


def _cpu() -> str:
    """The CPU's model and its widest vector instructions: TensorFlow turns its oneDNN
    kernels on by default only on CPUs with AVX-512 VNNI/BF16 or AMX, and runs Eigen's
    kernels elsewhere, so its baseline differs between machines."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in text.splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")),
        [],
    )
    wide = sorted(f for f in set(flags) if f.startswith(("avx512", "amx")) or f == "avx2")
    return f"{model} ({', '.join(wide) or 'no AVX2'})"


def _tf_onednn(tf) -> str:
    if tf is None:
        return "n/a"
    try:
        from tensorflow.python.util import _pywrap_util_port

        return "on" if _pywrap_util_port.IsMklEnabled() else "off (Eigen kernels)"
    except (ImportError, AttributeError):
        return f"unknown (TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS')})"


def _relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--order", type=int, default=10)
    args = parser.parse_args()
    try:
        import tensorflow as tf
    except ImportError:
        tf = None
    print("# jax-spectral vs TensorFlow on the original package's CIFAR CNN")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; python "
        f"{platform.python_version()}; jax {jax.__version__}; flax {flax.__version__}; "
        f"tensorflow {tf.__version__ if tf else 'not installed'}; "
        f"oneDNN {onednn.version() or 'not installed'}; backend {jax.default_backend()}; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}"
    )
    print(f"cpu: {_cpu()}; TensorFlow's oneDNN kernels: {_tf_onednn(tf)}")
    loss, params, (images, labels) = cifar_problem()
    x, y = images[:128], labels[:128]
    modes = {"stock": "none", "patches": "patches"}
    if onednn.available():
        modes["oneDNN"] = "onednn"
    ops = {
        label: hessian_operator(loss, params, (x, y), batch_size=128, rewrite=mode)
        for label, mode in modes.items()
    }
    plain = ops["stock"]
    v = jax.random.normal(jax.random.key(0), (plain.dim,), jnp.float32)
    rows, hvps, first = {}, {}, {}
    batch = (jnp.asarray(x), jnp.asarray(y))
    functions = {"stock": loss, "patches": cpu_friendly(loss, onednn=False)}
    if onednn.available():
        functions["oneDNN"] = cpu_friendly(loss)
    for label, fn in functions.items():
        grad = jax.jit(jax.grad(fn))
        rows[f"JAX gradient ({label})"] = _time(lambda grad=grad: grad(params, batch), args.repeats)
    for label, op in ops.items():
        first[f"JAX HVP ({label})"] = _timed(lambda op=op: op.matvec(v))  # compile included
        rows[f"JAX HVP ({label}, loop={op.loop})"] = _time(lambda op=op: op.matvec(v), args.repeats)
        hvps[f"JAX, {label}"] = np.asarray(op.matvec(v))
    best = list(ops)[-1]  # the CPU default: oneDNN where installed, else patches
    # as lanczos and slq run it: each batch's product linearised once per run, then applied
    linearised = ops[best].linearized()
    if linearised.linear is not None:
        rows[f"JAX ({best}): linearising, once per run"] = _time(
            lambda: ops[best].linearized().linear, args.repeats
        )
        rows[f"JAX HVP ({best}), linearised"] = _time(lambda: linearised.matvec(v), args.repeats)
        hvps[f"JAX, {best}, linearised"] = np.asarray(linearised.matvec(v))
    if ops[best].traceable:  # as lanczos and slq run it: many passes in one compiled loop
        many = jnp.stack([v * (1.0 + i) for i in range(LOOP_PASSES)])
        looped = jax.jit(lambda op, vs: jax.lax.map(op.matvec, vs))
        seconds = _time(lambda: looped(ops[best], many), max(1, args.repeats // 2))
        rows[f"JAX HVP ({best}), a pass in a loop of {LOOP_PASSES}"] = seconds / LOOP_PASSES
        if linearised.linear is not None:
            seconds = _time(lambda: looped(linearised, many), max(1, args.repeats // 2))
            rows[f"JAX HVP ({best}), linearised, in a loop of {LOOP_PASSES}"] = (
                seconds / LOOP_PASSES
            )
    if tf is not None:
        variables, tf_loss = _tf_model(params)
        grad, hvp_nested, hvp_forward = _tf_functions(variables, tf_loss, x, y)
        names = ["Conv_0", "Conv_1", "Conv_2", "Conv_3", "Dense_0", "Dense_1"]
        pairs = [(n, k) for n in names for k in ("kernel", "bias")]  # the TF variables' order
        tree = plain.unravel(v)
        tangent = [tf.constant(np.asarray(tree[n][k])) for n, k in pairs]

        def flat(parts):  # the TF variables' order -> the ravel_pytree order
            tree = {n: {} for n in names}
            for (n, k), part in zip(pairs, parts, strict=True):
                tree[n][k] = np.asarray(part)
            return np.asarray(plain.ravel(tree))

        rows["TF gradient"] = _time(grad, args.repeats)
        first["TF HVP (nested tapes)"] = _timed(lambda: hvp_nested(tangent))  # tracing included
        rows["TF HVP (nested tapes)"] = _time(lambda: hvp_nested(tangent), args.repeats)
        rows["TF HVP (forward-over-reverse)"] = _time(lambda: hvp_forward(tangent), args.repeats)
        hvps["TF, nested tapes"] = flat(hvp_nested(tangent))
        hvps["TF, forward-over-reverse"] = flat(hvp_forward(tangent))

    print(f"\n128 images, {plain.dim:,} parameters; one pass each")
    print(f"{'measurement':<48}{'seconds':>10}")
    for label, seconds in rows.items():
        print(f"{label:<48}{seconds:>10.3f}")
    print("\nfirst call (compilation or tracing included), seconds")
    for label, seconds in first.items():
        print(f"  {label:<46}{seconds:>10.3f}")
    print("\nHVP: relative max difference from JAX, stock")
    for label, value in hvps.items():
        print(f"  {label:<30}{_relative(value, hvps['JAX, stock']):.2e}")

    mine_grad = rows[f"JAX gradient ({best})"]
    mine_hvp = rows[f"JAX HVP ({best}, loop={ops[best].loop})"]
    stock_hvp = rows[f"JAX HVP (stock, loop={plain.loop})"]
    ratios = [
        (f"JAX HVP: stock / {label}", stock_hvp / rows[f"JAX HVP ({label}, loop={op.loop})"])
        for label, op in ops.items()
        if label != "stock"
    ]
    if tf is not None:
        ratios += [
            (f"JAX gradient ({best}) / TF gradient", mine_grad / rows["TF gradient"]),
            (f"JAX HVP ({best}) / TF HVP (nested tapes)", mine_hvp / rows["TF HVP (nested tapes)"]),
            (
                f"JAX HVP ({best}) / TF HVP (fwd-over-rev)",
                mine_hvp / rows["TF HVP (forward-over-reverse)"],
            ),
        ]
        linear = rows.get(f"JAX HVP ({best}), linearised")
        if linear is not None:
            ratios.append(
                (
                    f"JAX HVP ({best}) linearised / TF HVP (nested tapes)",
                    linear / rows["TF HVP (nested tapes)"],
                )
            )
        linear_loop = rows.get(f"JAX HVP ({best}), linearised, in a loop of {LOOP_PASSES}")
        if linear_loop is not None:
            ratios.append(
                (
                    f"JAX HVP ({best}) linearised, in a loop / TF",
                    linear_loop / rows["TF HVP (nested tapes)"],
                )
            )
        in_loop = rows.get(f"JAX HVP ({best}), a pass in a loop of {LOOP_PASSES}")
        if in_loop is not None:
            ratios.append(
                (
                    f"JAX HVP ({best}) in a loop / TF HVP (nested tapes)",
                    in_loop / rows["TF HVP (nested tapes)"],
                )
            )
    print(f"\n{'ratio':<48}")
    for label, ratio in ratios:
        print(f"{label:<48}{ratio:>10.2f}")
    if tf is None:
        return

    # Lanczos: ours on the default operator against the original's TF Lanczos.
    op = hessian_operator(loss, params, (x, y), batch_size=128)
    keys = iter(jax.random.split(jax.random.key(1), 2 * args.rounds + 2))
    shapes = [tuple(t.shape) for t in tangent]
    mine = lambda: lanczos(op, next(keys), args.order).tridiag  # noqa: E731
    theirs = lambda: _tf_lanczos(hvp_nested, shapes, args.order, 0)  # noqa: E731
    first_run = _timed(mine)  # compile included
    ours, original = [], []
    for _ in range(args.rounds):
        ours.append(_timed(mine))
        original.append(_timed(theirs))
    a, b = statistics.median(ours), statistics.median(original)
    print(f"\nLanczos, order {args.order}, medians of {args.rounds} alternating runs (seconds)")
    label = f"jax_spectral.lanczos ({op.rewrite}, loop={op.loop})"
    print(f"{label:<48}{a:>10.2f}")
    print(f"{'original TF Lanczos (nested tapes, NumPy f64)':<48}{b:>10.2f}")
    print(f"{'ratio JAX / TF':<48}{a / b:>10.2f}")
    print(f"{'jax_spectral.lanczos, first run (compile incl.)':<48}{first_run:>10.2f}")
    if onednn.available():
        _call_overhead()
        _kernel_times(tf, args.repeats)


def _kernel_times(tf, repeats: int) -> None:
    """Milliseconds per call of the three convolution kernels alone, on the CNN's two
    larger geometries (128 images, 3x3 'VALID'): oneDNN's compiled kernels through JAX
    against TensorFlow's own ops (its ``tf.function``s; the result fetched as NumPy)."""
    print("\nconvolution kernels alone, 128 images, milliseconds a call")
    print(f"{'geometry':<24}{'':<8}{'forward':>10}{'input grad':>12}{'kernel grad':>13}")
    for x_shape, w_shape in (
        ((128, 30, 30, 64), (3, 3, 64, 64)),
        ((128, 12, 12, 128), (3, 3, 128, 128)),
    ):
        name = "x".join(map(str, x_shape[1:])) + f" -> {w_shape[3]}"
        for label, calls in _kernel_calls(tf, x_shape, w_shape).items():
            times = [1e3 * _time(call, repeats) for call in calls]
            print(f"{name:<24}{label:<8}{times[0]:>10.1f}{times[1]:>12.1f}{times[2]:>13.1f}")


def _kernel_calls(tf, x_shape, w_shape) -> dict:
    """Forward, input-gradient and kernel-gradient calls of one geometry, both ways."""
    rng = np.random.default_rng(0)
    y_shape = (x_shape[0], x_shape[1] - 2, x_shape[2] - 2, w_shape[3])
    x, w, dy = (rng.standard_normal(s, dtype=np.float32) for s in (x_shape, w_shape, y_shape))
    xt, wt, dyt = tf.constant(x), tf.constant(w), tf.constant(dy)
    one, nn = [1, 1, 1, 1], tf.compat.v1.nn
    theirs = [
        tf.function(lambda: tf.nn.conv2d(xt, wt, 1, "VALID")),
        tf.function(lambda: nn.conv2d_backprop_input(x_shape, wt, dyt, one, "VALID")),
        tf.function(lambda: nn.conv2d_backprop_filter(xt, w_shape, dyt, one, "VALID")),
    ]
    xj, wj, dyj = jnp.asarray(x), jnp.asarray(w), jnp.asarray(dy)

    def conv(x, w):
        return onednn.conv(x, w, (1, 1), ((0, 0), (0, 0)), (1, 1))

    forward = jax.jit(conv)
    input_grad = jax.jit(lambda dy: jax.vjp(conv, xj, wj)[1](dy)[0])
    kernel_grad = jax.jit(lambda dy: jax.vjp(conv, xj, wj)[1](dy)[1])
    return {
        "oneDNN": [lambda: forward(xj, wj), lambda: input_grad(dyj), lambda: kernel_grad(dyj)],
        "TF": [lambda f=f: f().numpy() for f in theirs],
    }


def _call_overhead(steps: int = 2000) -> None:
    """Microseconds per call of a tiny convolution (one 4x4x2 image, a 3x3x2x2 kernel)
    inside one ``lax.scan`` of ``steps`` steps: oneDNN's compiled kernel against XLA's own
    convolution, idle and beside a Python thread that spins (as a notebook kernel or the
    checkpoint writer might)."""
    import threading

    x, w = jnp.ones((1, 4, 4, 2), jnp.float32), jnp.ones((3, 3, 2, 2), jnp.float32)
    convs = {
        "XLA": lambda c: jax.lax.conv_general_dilated(
            c, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        ),
        "oneDNN": lambda c: onednn.conv(c, w, (1, 1), ((1, 1), (1, 1)), (1, 1)),
    }
    loops = {
        name: jax.jit(
            lambda c, conv=conv: jax.lax.scan(
                lambda c, _: (0.5 * c + 1e-3 * conv(c), None), c, None, length=steps
            )[0]
        )
        for name, conv in convs.items()
    }
    results = {}
    for condition in ("idle", "busy Python thread"):
        stop = threading.Event()
        if condition != "idle":

            def spin(stop=stop):
                while not stop.is_set():
                    sum(range(1000))

            threading.Thread(target=spin, daemon=True).start()
        for name, loop in loops.items():
            results[name, condition] = _time(lambda loop=loop: loop(x), 5) / steps * 1e6
        stop.set()
    print(f"\ncall overhead: a tiny convolution in a scan of {steps} steps, microseconds a call")
    print(f"{'':<12}{'idle':>10}{'busy Python thread':>22}")
    for name in loops:
        idle, busy = results[name, "idle"], results[name, "busy Python thread"]
        print(f"{name:<12}{idle:>10.1f}{busy:>22.1f}")


def _timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
