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
    return parser


def run_demo(out: Path, *, order: int, seed: int, batch_size: int, train_steps: int) -> dict:
    """Train the digits MLP, run Lanczos on its dataset Hessian, write the density."""
    import jax
    import numpy as np
    from jax.flatten_util import ravel_pytree

    from . import datasets, density, hessian_operator, lanczos

    started = time.perf_counter()
    X, y = datasets.load_digits()
    model = datasets.mlp()
    key_init, key_lanczos = jax.random.split(jax.random.key(seed))
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

    operator = hessian_operator(loss, params, (X, y), batch_size=batch_size)
    result = lanczos(operator, key_lanczos, order)
    steps = int(result.num_steps)
    tridiag = np.asarray(result.tridiag, np.float64)[:steps, :steps]
    nodes, weights = density.tridiag_to_eigv(tridiag)
    dens, grid = density.tridiag_to_density(tridiag[None], sigma_squared=1e-5)
    top = sorted(nodes[0].tolist(), reverse=True)[:5]

    out.mkdir(parents=True, exist_ok=True)
    path = out / "density.npz"
    np.savez(path, grid=grid, density=dens, tridiag=tridiag, nodes=nodes[0], weights=weights[0])
    summary = {
        "num_params": int(num_params),
        "lanczos_steps": steps,
        "top_eigenvalues": top,
        "density": str(path),
        "seconds": round(time.perf_counter() - started, 2),
    }
    (out / "spectrum.json").write_text(json.dumps(summary, indent=2))
    print(f"Lanczos: {steps} steps on the dataset Hessian (reduce='mean')")
    print("top eigenvalues: " + ", ".join(f"{v:.5g}" for v in top))
    print(f"density written to {path} (grid, density, tridiag, nodes, weights)")
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
            )
        except ImportError as err:
            print(f"jax-spectral: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
