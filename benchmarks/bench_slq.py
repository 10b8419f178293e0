"""Probes in lockstep: one data pass serving k probes against k separate passes.

Run by hand:  python benchmarks/bench_slq.py [--model mlp|cnn|both] [--memory]

For k = 1, 4, 10 it times ``operator.matmat`` on k vectors (each batch read once and its
product linearised once, then applied to the tangents in chunks: the default chunks, sized
from one tangent's working memory, and all k at once) against k calls of
``operator.matvec``, on the digits
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
from jax_spectral.operators import tangent_chunk  # noqa: E402

PEAKS = {
    "one probe (matvec)": "one",
    "10 probes, default chunks": "chunked",
    "10 probes, all at once": "all",
}


def peak(mode):
    """In this process: the CIFAR CNN operator, one product pass of ``mode`` run twice,
    then the peak resident memory."""
    import resource

    loss, params, data = cifar_problem()
    op = hessian_operator(loss, params, data, batch_size=128)
    vs = jax.random.normal(jax.random.key(0), (10, op.dim), op.dtype)
    for _ in range(2):
        if mode == "one":
            jax.block_until_ready(op.matvec(vs[0]))
        else:
            jax.block_until_ready(op.matmat(vs, chunk=10 if mode == "all" else None))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def memory():
    """Peak memory of one and of ten probes' products, each in a fresh process."""
    import subprocess

    print("\n## CIFAR CNN, 256 images, batch 128: peak resident memory of a product pass")
    print(f"{'products':>28}{'peak (GiB)':>12}{'x one probe':>13}")
    one = None
    for name, mode in PEAKS.items():
        out = subprocess.run(
            [sys.executable, __file__, "--peak", mode], capture_output=True, text=True, check=True
        ).stdout.split()[-1]
        nbytes = int(out)
        one = one or nbytes
        print(f"{name:>28}{nbytes / 2**30:>12.2f}{nbytes / one:>13.2f}", flush=True)


def bench(name, op, repeats, slq_order=None):
    print(f"\n## {name}: {op.dim:,} parameters, loop {op.loop}")
    print(
        f"{'k':>3}{'chunk':>6}{'lockstep pass (s)':>20}{'k separate (s)':>17}{'ratio':>8}"
        f"{'all k at once (s)':>19}{'ratio':>8}"
    )
    for k in (1, 4, 10):
        vs = jax.random.normal(jax.random.key(k), (k, op.dim), op.dtype)
        together = _time(lambda vs=vs: op.matmat(vs), repeats)
        separate = _time(lambda vs=vs: [op.matvec(v) for v in vs], repeats)
        whole = _time(lambda vs=vs, k=k: op.matmat(vs, chunk=k), repeats)
        print(
            f"{k:>3}{tangent_chunk(op, k):>6}{together:>20.4f}{separate:>17.4f}"
            f"{together / separate:>8.2f}{whole:>19.4f}{whole / separate:>8.2f}",
            flush=True,
        )
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
    parser.add_argument("--memory", action="store_true", help="only the CNN peak memory")
    parser.add_argument("--peak", choices=sorted(set(PEAKS.values())), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak:
        return peak(args.peak)
    print("# jax-spectral lockstep probes benchmark")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; python "
        f"{platform.python_version()}; jax {jax.__version__}; backend {jax.default_backend()}"
    )
    if args.memory:
        return memory()
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
