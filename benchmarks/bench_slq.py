"""Probes in lockstep: one data pass serving k probes against k separate passes.

Run by hand:  python benchmarks/bench_slq.py [--model mlp|cnn|both]

For k = 1, 4, 10 it times ``operator.matmat`` on k vectors (each batch read once, its HVP
vmapped over the k tangents; for a host-driven operator in chunks of 4 tangents, the
default, and in one vmap over all k) against k calls of ``operator.matvec``, on the digits
MLP and on the original package's CIFAR CNN (256 synthetic images, batches of 128; with
the CPU rewrite, the scanned loop by default, and the host loop),
and for the MLP also a whole SLQ run (k probes x 80 steps, one scan) against k single-probe
Lanczos runs. The goal is lockstep <= 0.6 x separate at k = 10. A CNN SLQ step is its
matmat pass plus the vmapped recurrence, so the pass ratio is the SLQ ratio there.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import _time, cifar_problem, digits_problem  # noqa: E402

from jax_spectral import hessian_operator, lanczos, slq  # noqa: E402


def bench(name, op, repeats, slq_order=None):
    print(f"\n## {name}: {op.dim:,} parameters, loop {op.loop}")
    host = not op.traceable
    extra = f"{'one vmap (s)':>14}{'ratio':>8}" if host else ""
    print(f"{'k':>3}{'lockstep pass (s)':>20}{'k separate (s)':>17}{'ratio':>8}{extra}")
    for k in (1, 4, 10):
        vs = jax.random.normal(jax.random.key(k), (k, op.dim), op.dtype)
        together = _time(lambda vs=vs: op.matmat(vs), repeats)
        separate = _time(lambda vs=vs: [op.matvec(v) for v in vs], repeats)
        row = f"{k:>3}{together:>20.4f}{separate:>17.4f}{together / separate:>8.2f}"
        if host:
            whole = _time(lambda vs=vs, k=k: op.matmat(vs, chunk=k), repeats)
            row += f"{whole:>14.4f}{whole / separate:>8.2f}"
        print(row, flush=True)
    if slq_order:
        print(
            f"{'k':>3}{'SLQ lockstep (s)':>20}{'k runs (s)':>17}{'ratio':>8}   (order {slq_order})"
        )
        for k in (1, 4, 10):
            keys = jax.random.split(jax.random.key(0), k)
            together = _time(
                lambda k=k: (
                    slq(op, jax.random.key(0), num_probes=k, order=slq_order).lanczos.tridiag
                ),
                repeats,
            )
            separate = _time(
                lambda keys=keys: [lanczos(op, kk, slq_order).tridiag for kk in keys], repeats
            )
            print(f"{k:>3}{together:>20.4f}{separate:>17.4f}{together / separate:>8.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["mlp", "cnn", "both"], default="both")
    args = parser.parse_args()
    print("# jax-spectral lockstep probes benchmark")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; python "
        f"{platform.python_version()}; jax {jax.__version__}; backend {jax.default_backend()}"
    )
    if args.model in ("mlp", "both"):
        loss, params, data = digits_problem(train_steps=0)
        op = hessian_operator(loss, params, data, batch_size=512)
        bench("digits MLP, 1,797 samples, batch 512", op, 5, slq_order=80)
    if args.model in ("cnn", "both"):
        loss, params, data = cifar_problem()
        op = hessian_operator(loss, params, data, batch_size=128)
        bench("CIFAR CNN, 256 images, batch 128", op, 1)
        op = hessian_operator(loss, params, data, batch_size=128, loop="host")
        bench("CIFAR CNN, 256 images, batch 128, host loop", op, 1)


if __name__ == "__main__":
    main()
