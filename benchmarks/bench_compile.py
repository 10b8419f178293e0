"""First-run time on the original package's CIFAR CNN: without JAX's persistent compilation
cache, with it empty, and with it filled by an earlier process.

    python benchmarks/bench_compile.py            # Lanczos of order 5, 128 images

Each row is a fresh Python process that builds the default operator (the CPU rewrite with
oneDNN's compiled kernels where installed) and runs its first ``lanczos``; it reports the
seconds from the operator's construction to the run's end (imports and data excluded),
then a second run in the same process, whose programs are all compiled. The difference
is what compilation costs that run; the cache rows show how much of it a second process
skips (``jax-spectral demo|keras --compilation-cache DIR`` turns the cache on).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import textwrap

import jax

CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, sys.argv[1])
    import jax
    from bench_core import cifar_problem
    from jax_spectral import hessian_operator, lanczos
    from jax_spectral.cli import use_compilation_cache
    if sys.argv[2]:
        use_compilation_cache(sys.argv[2])
    loss, params, (images, labels) = cifar_problem()
    order = int(sys.argv[3])
    times = []
    for seed in (0, 1):
        start = time.perf_counter()
        op = hessian_operator(loss, params, (images[:128], labels[:128]), batch_size=128)
        jax.block_until_ready(lanczos(op, jax.random.key(seed), order).alphas)
        times.append(time.perf_counter() - start)
    print(op.rewrite, *times)
    """
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--order", type=int, default=5)
    args = parser.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    print("# first-run time, CIFAR CNN (128 images), fresh processes")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; python "
        f"{platform.python_version()}; jax {jax.__version__}"
    )
    print(f"\n{'process':<34}{'rewrite':>8}{'first run':>11}{'second run':>12}{'compile':>9}")
    with tempfile.TemporaryDirectory() as cache:
        for label, folder in (
            ("no persistent cache", ""),
            ("cache empty (fills it)", cache),
            ("cache filled by the process above", cache),
        ):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, here, folder, str(args.order)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            rewrite, first, second = out[-3], float(out[-2]), float(out[-1])
            print(f"{label:<34}{rewrite:>8}{first:>10.1f}s{second:>11.1f}s{first - second:>8.1f}s")


if __name__ == "__main__":
    main()
