"""The ``jax-spectral`` command line (also ``python -m jax_spectral``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jax-spectral", description="Hessian eigenvalue densities of neural networks in JAX."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train a small MLP on the bundled digits data and compute its Hessian spectrum",
    )
    demo.add_argument("--out", type=Path, default=Path("jax-spectral-demo"), help="output folder")
    demo.add_argument("--order", type=_positive_int, default=80, help="Lanczos steps (80)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (0)")
    demo.add_argument("--batch-size", type=_positive_int, default=512, help="HVP batch size")
    demo.add_argument("--train-steps", type=_positive_int, default=300, help="Adam steps (300)")
    demo.add_argument("--num-probes", type=_positive_int, default=5, help="SLQ probes (5)")
    return parser


def run_demo(
    out: Path, *, order: int, seed: int, batch_size: int, train_steps: int, num_probes: int = 5
) -> dict:
    """Train the digits MLP, then its Hessian's density (SLQ), top eigenpairs and trace.

    Writes ``spectrum.npz`` (grid, density, stderr, tridiagonals, nodes, weights),
    ``spectrum.json`` (eigenvalues, residuals, trace, settings, versions) and, when
    matplotlib is installed, ``density.png``.
    """
    import jax
    import numpy as np
    from jax.flatten_util import ravel_pytree

    from . import (
        __version__,
        datasets,
        eigenpairs,
        hessian_operator,
        hutchpp,
        slq,
        spectral_density,
    )

    started = time.perf_counter()
    X, y = datasets.load_digits()
    model = datasets.mlp()
    key_init, key_slq, key_eig, key_trace = jax.random.split(jax.random.key(seed), 4)
    params = model.init(key_init, X[:1])["params"]
    loss = datasets.cross_entropy_loss(model.apply)
    params = datasets.train_classifier(loss, params, (X, y), steps=train_steps)
    logits = model.apply({"params": params}, X)
    accuracy = float(np.mean(np.argmax(logits, axis=1) == y))
    num_params = ravel_pytree(params)[0].size
    print(
        f"trained a {num_params}-parameter MLP on digits ({len(X)} samples): "
        f"loss {float(loss(params, (X, y))):.4f}, accuracy {accuracy:.3f}"
    )
    trace_matvecs, num_top = 99, 5
    eig_order = min(num_params, max(4 * num_top, 80))  # eigenpairs' default order
    passes = order + eig_order + trace_matvecs
    basis_mb = num_probes * order * num_params * 4 / 2**20
    print(
        f"cost: about {passes} passes over the data ({order} serving all {num_probes} SLQ "
        f"probes at once), Lanczos bases {basis_mb:.1f} MiB"
    )

    operator = hessian_operator(loss, params, (X, y), batch_size=batch_size)
    result = slq(operator, key_slq, num_probes=num_probes, order=order)
    dens = spectral_density(result, sigma_squared=1e-5)
    pairs = eigenpairs(operator, key_eig, num_top, which="largest", order=eig_order)
    trace = hutchpp(operator, key_trace, num_matvecs=trace_matvecs)

    out.mkdir(parents=True, exist_ok=True)
    np.savez(
        out / "spectrum.npz", grid=dens.grid, density=dens.density, stderr=dens.stderr,
        tridiags=np.asarray(result.lanczos.tridiag), nodes=result.nodes, weights=result.weights,
        top_eigenvalues=pairs.values, residuals=pairs.residuals,
    )  # fmt: skip
    summary = {
        "model": "digits MLP 64-32-10 (tanh)",
        "num_params": int(num_params),
        "num_samples": len(X),
        "train_accuracy": accuracy,
        "top_eigenvalues": pairs.values.tolist(),
        "residuals": pairs.residuals.tolist(),
        "converged": pairs.converged.tolist(),
        "trace": trace.estimate,
        "trace_stderr": trace.stderr,
        "settings": {
            "order": order, "num_probes": num_probes, "seed": seed, "batch_size": batch_size,
            "train_steps": train_steps, "sigma_squared": 1e-5, "reduce": "mean",
            "trace_matvecs": trace_matvecs,
        },
        "versions": {"jax_spectral": __version__, "jax": jax.__version__},
        "seconds": None,
    }  # fmt: skip
    try:
        from .plot import plot_density

        plot_density(dens, outliers=pairs.values, path=out / "density.png",
                     title=f"Hessian density, digits MLP ({num_probes} probes)")  # fmt: skip
        figure = str(out / "density.png")
    except ImportError:
        figure = "not drawn (pip install 'jax-spectral[plot]' for density.png)"
    summary["seconds"] = round(time.perf_counter() - started, 2)
    (out / "spectrum.json").write_text(json.dumps(summary, indent=2))
    print(f"SLQ: {num_probes} probes x {order} Lanczos steps on the dataset Hessian")
    print("top eigenvalues: " + ", ".join(f"{v:.5g}" for v in pairs.values))
    print(f"trace: {trace.estimate:.5g} +- {trace.stderr:.2g} (Hutch++, {trace_matvecs} products)")
    print(f"density written to {out / 'spectrum.npz'}; figure: {figure}")
    print(f"summary written to {out / 'spectrum.json'} ({summary['seconds']} s)")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        try:
            run_demo(
                args.out,
                order=args.order,
                seed=args.seed,
                batch_size=args.batch_size,
                train_steps=args.train_steps,
                num_probes=args.num_probes,
            )
        except ImportError as err:
            print(f"jax-spectral: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
