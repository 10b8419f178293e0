"""Curvature products against the Hessian's: GGN, empirical and Monte-Carlo Fisher.

Run by hand (not part of the tests):

    python benchmarks/bench_curvature.py                 # digits MLP and CIFAR CNN
    python benchmarks/bench_curvature.py --ref 7bdcb2c   # also the Hessian before/after

For the demo's digits MLP (1,797 samples, batches of 512) and the original package's CIFAR
CNN (256 synthetic images, batches of 128), one product over the whole dataset with each
operator (defaults: on CPU the CPU rewrite, ``loop="auto"``), timed in alternation over
several rounds after a compile-and-warm-up call; the table gives medians and the ratio
to the Hessian's product measured in the same run. ``--ref COMMIT`` times the Hessian
product of that commit (a git worktree, run in a subprocess) against this tree's, the
two alternated, for the refactor's cost.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def problems(which):
    from bench_core import CifarCNN, cifar_problem, digits_problem

    from jax_spectral import datasets

    out = {}
    if which in ("mlp", "both"):
        loss, params, data = digits_problem()
        out["digits MLP"] = (datasets.mlp().apply, loss, params, data, 512)
    if which in ("cnn", "both"):
        loss, params, data = cifar_problem()
        out["CIFAR CNN"] = (CifarCNN().apply, loss, params, data, 128)
    return out


def timed(fn, repeats=1):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hessian_only(model, rounds):
    """Print the median seconds of one Hessian product pass (for --ref's subprocesses)."""
    from jax_spectral import hessian_operator

    _, loss, params, data, batch_size = problems(model)[
        "digits MLP" if model == "mlp" else "CIFAR CNN"
    ]
    H = hessian_operator(loss, params, data, batch_size=batch_size)
    v = jax.random.normal(jax.random.key(0), (H.dim,), H.dtype)
    jax.block_until_ready(H.matvec(v))
    print(timed(lambda: H.matvec(v), rounds))


def compare(name, apply, loss, params, data, batch_size, rounds):
    from jax_spectral import fisher_operator, ggn_operator, hessian_operator

    def model(p, x):
        return apply({"params": p}, x)

    ops = {
        "Hessian": hessian_operator(loss, params, data, batch_size=batch_size),
        "GGN": ggn_operator(model, "softmax_cross_entropy", params, data, batch_size=batch_size),
        "empirical Fisher": fisher_operator(
            model, "softmax_cross_entropy", params, data, batch_size=batch_size
        ),
        "MC Fisher (1 draw)": fisher_operator(
            model,
            "softmax_cross_entropy",
            params,
            data,
            batch_size=batch_size,
            kind="mc",
            key=jax.random.key(1),
        ),
    }
    v = jax.random.normal(jax.random.key(0), (ops["Hessian"].dim,), jnp.float32)
    for op in ops.values():
        jax.block_until_ready(op.matvec(v))  # compile and warm up
    times = {label: [] for label in ops}
    for _ in range(rounds):
        for label, op in ops.items():
            times[label].append(timed(lambda op=op: op.matvec(v)))
    hessian = statistics.median(times["Hessian"])
    loop = ops["Hessian"].loop
    print(
        f"\n## {name}: {ops['Hessian'].dim:,} parameters, loop={loop}, rewrite="
        f"{ops['Hessian'].rewrite}; medians of {rounds} alternated rounds"
    )
    print(f"{'product pass':<22}{'seconds':>10}{'/ Hessian':>11}")
    for label in ops:
        seconds = statistics.median(times[label])
        print(f"{label:<22}{seconds:>10.4f}{seconds / hessian:>11.2f}")


def compare_ref(ref, model, rounds):
    tree = Path(f"/tmp/jax-spectral-ref-{ref}")
    if not tree.exists():
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref],
            check=True,
            capture_output=True,
        )
    script = str(Path(__file__).resolve())
    results = {"before": [], "after": []}
    for _ in range(rounds):
        for label, path in (("before", tree), ("after", ROOT)):
            env = {**os.environ, "PYTHONPATH": f"{path}:{path / 'benchmarks'}"}
            repeats = "200" if model == "mlp" else "5"  # an MLP pass is about a millisecond
            out = subprocess.run(
                [sys.executable, script, "--hessian-only", model, "--rounds", repeats],
                env=env,
                capture_output=True,
                text=True,
                check=True,
                cwd=path,
            )
            results[label].append(float(out.stdout.strip().splitlines()[-1]))
    before, after = (statistics.median(results[k]) for k in ("before", "after"))
    print(f"\n## Hessian product, {model}: {ref} (before) against this tree (after)")
    print(
        f"before {before:.4f} s, after {after:.4f} s, after / before {after / before:.3f} "
        f"(medians of {rounds} alternated processes, each its passes' median)"
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["mlp", "cnn", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ref", help="a commit whose Hessian product to time against")
    parser.add_argument("--hessian-only", choices=["mlp", "cnn"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hessian_only:
        return hessian_only(args.hessian_only, args.rounds)
    machine = platform.processor() or platform.machine()
    print(
        f"# bench_curvature: {machine}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
        f"backend {jax.default_backend()}"
    )
    for name, (apply, loss, params, data, batch_size) in problems(args.model).items():
        compare(name, apply, loss, params, data, batch_size, args.rounds)
    if args.ref:
        for model in ["mlp", "cnn"] if args.model == "both" else [args.model]:
            compare_ref(args.ref, model, 5)


if __name__ == "__main__":
    main()
