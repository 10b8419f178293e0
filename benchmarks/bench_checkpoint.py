"""Cost of checkpointing: Lanczos and SLQ with a checkpoint every 10 steps against none.

Run by hand:  python benchmarks/bench_checkpoint.py

On the digits MLP (2,410 parameters, 1,797 samples, batches of 512) at order 90: one
Lanczos run, and SLQ with 10 probes. A checkpointed scanned run is a sequence of compiled
segments of 10 steps, each followed by an atomic write of the new basis rows and the small
state. The third row drives the same operator from the host (one dispatch per batch), as
streamed data and CPU convnets are. The goal is an overhead of at most 5 %.

Runs of 40-200 ms on 2 shared cores vary by several per cent from one to the next, so
plain and checkpointed runs alternate and each figure is the median of ``ROUNDS`` runs,
every checkpointed run into a fresh folder. The breakdown below the table takes the
scanned Lanczos run apart: the same segments with nothing saved, then with the copies
moved to the host but nothing written, then everything.
"""

from __future__ import annotations

import importlib
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import digits_problem  # noqa: E402

from jax_spectral import hessian_operator, lanczos, slq  # noqa: E402

checkpoint_module = importlib.import_module("jax_spectral.checkpoint")
Checkpointer = checkpoint_module.Checkpointer
ROUNDS = 21


def _alternating(variants: dict, rounds: int = ROUNDS) -> dict:
    """Median seconds of each variant, run in turn ``rounds`` times after a warm-up."""
    for fn in variants.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _saving_nothing(self, state, next_step, done, on_saved=None, background=True):
    self.folder.mkdir(parents=True, exist_ok=True)


def _copying_only(self, new_rows, small, next_step, done, on_saved):
    jax.device_get((new_rows, small))


def _patched(fn, **methods):
    """``fn`` with Checkpointer methods replaced for the duration of each call."""

    def run():
        saved = {name: getattr(Checkpointer, name) for name in methods}
        for name, method in methods.items():
            setattr(Checkpointer, name, method)
        try:
            return fn()
        finally:
            for name, method in saved.items():
                setattr(Checkpointer, name, method)

    return run


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
    print(f"medians of {ROUNDS} alternating runs")
    print(f"\n{'run':<22}{'plain (s)':>11}{'every 10 (s)':>14}{'overhead':>10}")
    with tempfile.TemporaryDirectory() as root:
        folders = (f"{root}/{n}" for n in itertools.count())  # a fresh folder per run
        for name, fn in runs.items():
            t = _alternating(
                {
                    "plain": fn,
                    "saved": lambda fn=fn: fn(checkpoint=next(folders)),
                }
            )
            print(
                f"{name:<22}{t['plain']:>11.4f}{t['saved']:>14.4f}"
                f"{t['saved'] / t['plain'] - 1:>10.1%}"
            )

        scanned = runs["lanczos, order 90"]
        saved = lambda: scanned(checkpoint=next(folders))  # noqa: E731
        t = _alternating(
            {
                "plain run": scanned,
                "9 segments, nothing saved": _patched(saved, save=_saving_nothing),
                "+ copies to the host": _patched(saved, _write=_copying_only),
                "+ writes (everything)": saved,
            }
        )
        print("\nbreakdown, scanned lanczos, order 90, every 10")
        for name, seconds in t.items():
            print(f"  {name:<28}{seconds:>9.4f} s{seconds / t['plain run'] - 1:>+9.1%}")


if __name__ == "__main__":
    main()
