"""Core engine speed: gradient pass, HVP pass and Lanczos, for an MLP and a CNN.

Run by hand (not part of the tests):

    python benchmarks/bench_core.py            # both models
    python benchmarks/bench_core.py --model mlp --skip-scan-cnn

Models
------
(a) the digits MLP of the demo (64-32-10, tanh; 2,410 parameters) on the 1,797 digits
    samples in batches of 512 (three full batches and a ragged one);
(b) the original package's CIFAR-10 CNN (conv64, conv64, maxpool, conv128, conv128,
    maxpool, dense1024, dense10; 'VALID' 3x3 convolutions; 3,548,234 parameters) on 256
    synthetic 32x32x3 images in batches of 128.

For each it prints one full-data gradient pass (of the loss as the operator evaluates it:
on CPU through the CPU rewrite of ``jax_spectral.rewrite``), one HVP pass through
``hessian_operator`` (default ``rewrite``) with each batch loop (``scan``: one compiled
lax.scan over batches; ``host``: a Python loop over a jitted per-batch step) and with the
default that
``loop="auto"`` picks, a Lanczos run of ``m`` steps on the default operator, and the
ratios HVP/gradient and Lanczos / (m x HVP pass). For the MLP, the same ratio for a list
of in-memory batches ``[(x, y), ...]`` (stacked and scanned) and for the same batches
streamed from a callable (host loop); for both models, Lanczos with a float64 recurrence
on float32 products against the float32 recurrence, with the basis sizes. Because one CNN
pass varies by a few per cent from call to call, Lanczos is also compared with m HVP
passes run back to back (normalised power iteration), the two alternated over several
rounds. Times are medians
after a compile-and-warm-up call.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from jax_spectral import datasets, estimate, hessian_operator, lanczos
from jax_spectral.data import split_arrays


def _time(fn, repeats):
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class CifarCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        for width in (64, 64):
            x = nn.relu(nn.Conv(width, (3, 3), padding="VALID")(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        for width in (128, 128):
            x = nn.relu(nn.Conv(width, (3, 3), padding="VALID")(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(1024)(x))
        return nn.Dense(10)(x)


def digits_problem(train_steps=100):
    """The demo's digits MLP (lightly trained): (loss, params, (x, y))."""
    x, y = datasets.load_digits()
    model = datasets.mlp()
    loss = datasets.cross_entropy_loss(model.apply)
    params = model.init(jax.random.key(0), x[:1])["params"]
    return loss, datasets.train_classifier(loss, params, (x, y), steps=train_steps), (x, y)


def cifar_problem():
    """The original package's CIFAR CNN on 256 synthetic images: (loss, params, data)."""
    model = CifarCNN()
    rng = np.random.default_rng(0)
    images = rng.standard_normal((256, 32, 32, 3), dtype=np.float32)
    labels = rng.integers(0, 10, 256).astype(np.int32)
    params = model.init(jax.random.key(0), images[:1])["params"]
    return _classifier_loss(model), params, (images, labels)


def _classifier_loss(model):
    def loss(params, batch):
        x, y = batch
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss


def _gradient_pass(loss, params, data, batch_size, loop):
    """One full-data pass of gradients, with the same batch loop as the operator."""
    split = split_arrays(data, batch_size)
    stacked = jax.tree_util.tree_map(jnp.asarray, split.stacked)
    grad = jax.grad(loss)

    if loop == "scan":

        @jax.jit
        def run(params):
            def body(acc, batch):
                return jax.tree_util.tree_map(jnp.add, acc, grad(params, batch)), None

            zero = jax.tree_util.tree_map(jnp.zeros_like, params)
            return jax.lax.scan(body, zero, stacked)[0]

        return lambda: run(params)

    step = jax.jit(
        lambda params, stacked, i: grad(params, jax.tree_util.tree_map(lambda a: a[i], stacked))
    )
    num = jax.tree_util.tree_leaves(stacked)[0].shape[0]

    def run_host():
        acc = None
        for i in range(num):
            g = step(params, stacked, i)
            acc = g if acc is None else jax.tree_util.tree_map(jnp.add, acc, g)
        return acc

    return run_host


def bench(name, loss, params, data, batch_size, order, repeats, rounds, skip_scan):
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    auto = hessian_operator(loss, params, data, batch_size=batch_size)
    rows = []
    # The gradient of the loss as the operator evaluates it (on CPU: the CPU rewrite).
    grad_time = _time(
        _gradient_pass(auto.product_loss, params, data, batch_size, auto.loop), repeats
    )
    rows.append(("gradient pass", grad_time))
    v = jax.random.normal(jax.random.key(0), (auto.dim,), auto.dtype)
    hvp_times = {}
    for loop in ("scan", "host"):
        if loop == "scan" and skip_scan:
            continue
        op = hessian_operator(loss, params, data, batch_size=batch_size, loop=loop)
        reps = 1 if (loop == "scan" and auto.loop == "host") else repeats
        hvp_times[loop] = _time(lambda op=op: op.matvec(v), reps)
        rows.append((f"HVP pass, loop={loop}", hvp_times[loop]))
    hvp_time = hvp_times[auto.loop]

    # Lanczos against m HVP passes run back to back, alternated so that both see the same
    # machine state; the ratio of medians is the figure of merit.
    def m_passes():
        x = v
        for _ in range(order):
            x = auto.matvec(x)
            x = x / jnp.linalg.norm(x)
        return x

    keys = iter(jax.random.split(jax.random.key(1), 2 * rounds + 2))
    run_lanczos = lambda: lanczos(auto, next(keys), order).tridiag  # noqa: E731
    jax.block_until_ready(run_lanczos())  # compile
    passes_times, lanczos_times = [], []
    for _ in range(rounds):
        passes_times.append(_time(m_passes, 1))
        lanczos_times.append(_time(run_lanczos, 1))
    passes_time = statistics.median(passes_times)
    lanczos_time = statistics.median(lanczos_times)
    rows.append((f"{order} HVP passes back to back", passes_time))
    rows.append((f"Lanczos, m={order} (loop={auto.loop})", lanczos_time))
    print(f"\n## {name}: {num_params:,} parameters, default loop: {auto.loop}")
    print(f"{'measurement':<34}{'seconds':>12}")
    for label, seconds in rows:
        print(f"{label:<34}{seconds:>12.4f}")
    print(f"{'HVP / gradient':<34}{hvp_time / grad_time:>12.2f}")
    if "scan" in hvp_times and "host" in hvp_times:
        print(f"{'HVP scan / HVP host':<34}{hvp_times['scan'] / hvp_times['host']:>12.2f}")
    print(f"{f'Lanczos / ({order} x HVP pass)':<34}{lanczos_time / (order * hvp_time):>12.3f}")
    print(f"{f'Lanczos / ({order} passes in a row)':<34}{lanczos_time / passes_time:>12.3f}")
    print(f"(medians: single passes of {repeats} repeats; Lanczos and passes in a row of {rounds})")


def bench_list(loss, params, data, batch_size, order, repeats, rounds):
    """A list of in-memory batches (stacked and scanned) against the same batches streamed
    from a callable (host loop): Lanczos / (m x HVP pass) for each."""
    x, y = data
    batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    print(
        f"\n## list of {len(batches)} in-memory batches of {batch_size} (last "
        f"{len(batches[-1][0])}), m = {order}"
    )
    print(f"{'data':<28}{'loop':>6}{'HVP pass':>12}{'Lanczos':>12}{'Lanczos/(m x pass)':>20}")
    for label, source in (
        ("list [(x, y), ...]", batches),
        ("callable (stream)", lambda: iter(batches)),
    ):
        op = hessian_operator(loss, params, source)
        v = jax.random.normal(jax.random.key(0), (op.dim,), op.dtype)
        hvp_time = _time(lambda op=op, v=v: op.matvec(v), repeats)
        keys = iter(jax.random.split(jax.random.key(1), 2 * rounds))
        lanczos_time = statistics.median(
            _time(lambda op=op, keys=keys: lanczos(op, next(keys), order).tridiag, 1)
            for _ in range(rounds)
        )
        ratio = lanczos_time / (order * hvp_time)
        print(f"{label:<28}{op.loop:>6}{hvp_time:>12.5f}{lanczos_time:>12.4f}{ratio:>20.3f}")


def bench_recurrence(loss, params, data, batch_size, order, rounds):
    """Lanczos with a float64 recurrence on float32 products against the float32 one."""
    op = hessian_operator(loss, params, data, batch_size=batch_size)
    times = {}
    for dtype in ("float32", "float64"):
        keys = iter(jax.random.split(jax.random.key(2), 2 * rounds))

        def run(dtype=dtype, keys=keys):
            return lanczos(op, next(keys), order, recurrence_dtype=dtype).tridiag

        times[dtype] = statistics.median(_time(run, 1) for _ in range(rounds))
    print(f"\n## recurrence dtype, m = {order}, loop={op.loop}")
    print(f"{'recurrence':<14}{'Lanczos s':>12}{'basis':>14}")
    for dtype, seconds in times.items():
        basis = estimate(op, order=order, recurrence_dtype=dtype)
        print(f"{dtype:<14}{seconds:>12.4f}{basis.basis_bytes / 2**20:>11.1f} MiB")
    print(f"{'float64 / float32':<14}{times['float64'] / times['float32']:>12.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["mlp", "cnn", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="CNN Lanczos/passes rounds")
    parser.add_argument("--skip-scan-cnn", action="store_true", help="skip the slow CNN scan pass")
    parser.add_argument(
        "--only-new",
        action="store_true",
        help="only the list-of-batches and recurrence-dtype sections",
    )
    args = parser.parse_args()

    print("# jax-spectral core benchmark")
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs; "
        f"python {platform.python_version()}; jax {jax.__version__}; flax {flax.__version__}; "
        f"backend {jax.default_backend()} ({jax.devices()[0].device_kind})"
    )
    if args.model in ("mlp", "both"):
        loss, params, data = digits_problem()
        if not args.only_new:
            bench(
                "digits MLP, 1,797 samples, batch 512",
                loss,
                params,
                data,
                512,
                80,
                args.repeats,
                rounds=5,
                skip_scan=False,
            )
        bench_list(loss, params, data, 256, 80, args.repeats, rounds=5)
        bench_recurrence(loss, params, data, 512, 80, rounds=5)
    if args.model in ("cnn", "both"):
        loss, params, data = cifar_problem()
        if not args.only_new:
            bench(
                "CIFAR CNN, 256 images, batch 128",
                loss,
                params,
                data,
                128,
                20,
                max(1, args.repeats // 2),
                rounds=args.rounds,
                skip_scan=args.skip_scan_cnn,
            )
        bench_recurrence(loss, params, data, 128, 20, rounds=args.rounds)


if __name__ == "__main__":
    main()
