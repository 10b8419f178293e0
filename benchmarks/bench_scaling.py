"""Data-parallel scaling: one HVP pass and a Lanczos step on 1, 2, 4, ... devices.

Written for a machine with several accelerators (GPUs or TPUs); it runs anywhere:

    python benchmarks/bench_scaling.py                       # every power of 2 up to all devices
    python benchmarks/bench_scaling.py --model cnn --samples 4096 --batch-size 512
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python benchmarks/bench_scaling.py --quick

For each device count ``k`` the same data (``--samples``, in batches of ``--batch-size``,
split over the ``k`` devices of a one-axis ``"data"`` mesh) gives one operator, and the
script prints:

- what ``loop="auto"`` chose, and one HVP pass with each loop (``scan``, ``host``);
- one full-data gradient pass (``jax.grad`` summed over the same batches in a compiled
  loop), and the ratio HVP / gradient: the number that turns a training step's measured
  time into a Lanczos step's on a larger job (docs/scale.md);
- HVP throughput in samples per second, and the speed-up and efficiency against ``k = 1``;
- a Lanczos run of ``--order`` steps with the basis split over the ``k`` devices
  (``basis_sharding``), per step, and the basis bytes per device.

Times are medians of ``--repeats`` calls after a compile-and-warm-up call. Forced CPU
devices share the same cores, so on a CPU the table checks that the script runs, not how
the work scales.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from bench_core import CifarCNN, _classifier_loss, _time  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jax_spectral import estimate, hessian_operator, lanczos  # noqa: E402
from jax_spectral.data import split_arrays  # noqa: E402


class WideMLP(nn.Module):
    width: int
    depth: int

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        for _ in range(self.depth):
            x = nn.gelu(nn.Dense(self.width)(x))
        return nn.Dense(10)(x)


def _problem(model_name: str, samples: int, width: int, depth: int):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((samples, 32, 32, 3), dtype=np.float32)
    labels = rng.integers(0, 10, samples).astype(np.int32)
    model = CifarCNN() if model_name == "cnn" else WideMLP(width, depth)
    params = model.init(jax.random.key(0), images[:1])["params"]
    return _classifier_loss(model), params, (images, labels)


def _gradient_pass(loss, params, stacked, mesh):
    """One gradient pass over the stacked batches, each split over the mesh."""
    stacked = jax.device_put(stacked, NamedSharding(mesh, P(None, "data")))
    params = jax.device_put(params, NamedSharding(mesh, P()))

    @jax.jit
    def run(params, stacked):
        def body(acc, batch):
            return jax.tree_util.tree_map(jnp.add, acc, jax.grad(loss)(params, batch)), None

        zero = jax.tree_util.tree_map(jnp.zeros_like, params)
        return jax.lax.scan(body, zero, stacked)[0]

    return lambda: run(params, stacked)


def _row(k, loss, params, data, args, devices):
    mesh = jax.sharding.Mesh(
        np.array(devices[:k]), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
    )
    ops = {
        loop: hessian_operator(loss, params, data, batch_size=args.batch_size, mesh=mesh, loop=loop)
        for loop in ("auto", "scan", "host")
    }
    v = jax.random.normal(jax.random.key(1), (ops["scan"].dim,), ops["scan"].dtype)
    hvp = {loop: _time(lambda op=op: op.matvec(v), args.repeats) for loop, op in ops.items()}
    stacked = split_arrays(data, args.batch_size).stacked
    gradient = _time(_gradient_pass(loss, params, stacked, mesh), args.repeats)
    basis_sharding = NamedSharding(mesh, P(None, "data"))
    op = ops["auto"]
    run = lambda: lanczos(op, jax.random.key(2), args.order, basis_sharding=basis_sharding).tridiag  # noqa: E731
    step = _time(run, max(1, args.repeats // 2)) / args.order
    per_device = estimate(
        op, order=args.order, basis_sharding=basis_sharding
    ).basis_bytes_per_device
    return {
        "k": k,
        "auto": op.loop,
        "scan": hvp["scan"],
        "host": hvp["host"],
        "auto_s": hvp["auto"],
        "grad": gradient,
        "step": step,
        "basis": per_device,
        "samples": int(op.num_samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--width", type=int, default=2048, help="MLP width (2048)")
    parser.add_argument("--depth", type=int, default=4, help="MLP hidden layers (4)")
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--order", type=int, default=20, help="Lanczos steps timed (20)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--devices", help="comma-separated device counts (powers of 2)")
    parser.add_argument("--quick", action="store_true", help="a small problem: checks the script")
    args = parser.parse_args()
    if args.quick:
        args.width, args.depth, args.samples, args.batch_size = 64, 2, 512, 128
        args.order, args.repeats = 8, 2
    devices = jax.devices()
    counts = (
        [int(c) for c in args.devices.split(",")]
        if args.devices
        else [2**i for i in range(int(np.log2(len(devices))) + 1)]
    )
    loss, params, data = _problem(args.model, args.samples, args.width, args.depth)
    dim = sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))
    print("# data-parallel scaling of the HVP pass and the Lanczos step")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; devices: {len(devices)} x "
        f"{devices[0].device_kind} ({jax.default_backend()}); python "
        f"{platform.python_version()}; jax {jax.__version__}"
    )
    print(
        f"model {args.model} ({dim:,} parameters), {args.samples} samples in batches of "
        f"{args.batch_size}; Lanczos order {args.order}, basis split over the devices\n"
    )
    header = (
        f"{'devices':>7} {'auto':>5} {'HVP scan s':>10} {'HVP host s':>10} {'grad s':>8} "
        f"{'HVP/grad':>8} {'samples/s':>10} {'speed-up':>8} {'effic.':>6} "
        f"{'step s':>8} {'basis/dev':>10}"
    )
    print(header)
    first = None
    for k in counts:
        row = _row(k, loss, params, data, args, devices)
        first = first or row
        best = min(row["scan"], row["host"])
        speedup = min(first["scan"], first["host"]) / best
        print(
            f"{k:>7} {row['auto']:>5} {row['scan']:>10.4f} {row['host']:>10.4f} "
            f"{row['grad']:>8.4f} {best / row['grad']:>8.2f} {row['samples'] / best:>10.0f} "
            f"{speedup:>8.2f} {speedup / k:>6.2f} {row['step']:>8.4f} "
            f"{row['basis'] / 2**20:>8.1f}MB",
            flush=True,
        )
    print(
        "\nauto: the loop loop='auto' picked (measured on the first batch); samples/s and "
        "the speed-up use the faster loop; step: one Lanczos step, its HVP pass included."
    )


if __name__ == "__main__":
    main()
