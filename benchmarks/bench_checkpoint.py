"""Cost of checkpointing: Lanczos and SLQ with a checkpoint every 10 steps against none.

Run by hand:  python benchmarks/bench_checkpoint.py

On the digits MLP (2,410 parameters, 1,797 samples, batches of 512) at order 90: one
Lanczos run, and SLQ with 10 probes. A checkpointed scanned run is a sequence of compiled
segments of 10 steps, each followed by an atomic write of the new basis rows and the small
state. Times are medians of 5 runs after a warm-up, each checkpointed run into a fresh
folder. The goal is an overhead of at most 5 %. The third row drives the same operator
from the host (one dispatch per batch), as streamed data and CPU convnets are.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import _time, digits_problem  # noqa: E402

from jax_spectral import hessian_operator, lanczos, slq  # noqa: E402


def main():
    print("# jax-spectral checkpoint overhead benchmark")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; python "
        f"{platform.python_version()}; jax {jax.__version__}; backend {jax.default_backend()}"
    )
    loss, params, data = digits_problem()
    op = hessian_operator(loss, params, data, batch_size=512)
    host = hessian_operator(loss, params, data, batch_size=512, loop="host")
    key = jax.random.key(0)
    runs = {
        "lanczos, order 90": lambda **kw: lanczos(op, key, 90, **kw).tridiag,
        "SLQ, 10 probes x 90": lambda **kw: slq(op, key, num_probes=10, order=90, **kw).nodes,
        "lanczos, host loop": lambda **kw: lanczos(host, key, 90, **kw).tridiag,
    }
    print(f"\n{'run':<22}{'plain (s)':>11}{'every 10 (s)':>14}{'overhead':>10}")
    with tempfile.TemporaryDirectory() as root:
        for i, (name, fn) in enumerate(runs.items()):
            plain = _time(fn, 5)
            folders = (f"{root}/{i}-{n}" for n in range(1000))  # a fresh folder per run
            saved = _time(lambda fn=fn, folders=folders: fn(checkpoint=next(folders)), 5)
            print(f"{name:<22}{plain:>11.4f}{saved:>14.4f}{saved / plain - 1:>10.1%}")


if __name__ == "__main__":
    main()
