"""When a float64 Lanczos recurrence on float32 products matters.

Run by hand (not part of the tests):

    python benchmarks/bench_precision.py

On the demo's digits MLP (2,410 parameters, trained 200 steps, all 1,797 samples in
batches of 512) it runs Lanczos at order 90 and 300 with a float32 recurrence and with a
float64 recurrence, both on the same float32 Hessian-vector products and the same start
vector, and prints the loss of orthogonality of the basis, max |V V^T - I|, the three-term
relation's residual, and the accuracy of the top and bottom Ritz values against
``numpy.linalg.eigh`` of the dense float64 Hessian (computed column by column in float64).
The relation is max |V A V^T - T| / max |eig(A)| with the dense A.
"""

from __future__ import annotations

import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
from bench_core import digits_problem

from jax_spectral import hessian_operator, lanczos


def digits_dense():
    loss, params, (x, y) = digits_problem(train_steps=200)
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        op64 = hessian_operator(loss, p64, (x.astype(np.float64), y), batch_size=512)
        eye = np.eye(op64.dim)
        dense = np.concatenate(
            [
                np.asarray(jax.vmap(op64.matvec)(jnp.asarray(eye[i : i + 256])))
                for i in range(0, op64.dim, 256)
            ]
        )
    return hessian_operator(loss, params, (x, y), batch_size=512), (dense + dense.T) / 2


def main():
    print("# float32 vs float64 Lanczos recurrence on float32 products")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; python "
        f"{platform.python_version()}; jax {jax.__version__}; backend {jax.default_backend()}"
    )
    op, dense = digits_dense()
    exact = np.linalg.eigvalsh(dense)
    scale = np.abs(exact).max()
    print(f"digits MLP: {op.dim} parameters, eigenvalues in [{exact[0]:.4g}, {exact[-1]:.4g}]")
    header = (
        f"{'order':>6}{'recurrence':>12}{'steps':>7}{'max|VV^T-I|':>14}{'|VAV^T-T|/|A|':>14}"
        f"{'top-5 rel err':>15}{'min rel err':>13}"
    )
    print(header)
    for order in (90, 300):
        for dtype in ("float32", "float64"):
            res = lanczos(op, jax.random.key(0), order, recurrence_dtype=dtype)
            k = int(res.num_steps)
            basis = np.asarray(res.basis, np.float64)[:k]
            tridiag = np.asarray(res.tridiag, np.float64)[:k, :k]
            ortho = np.abs(basis @ basis.T - np.eye(k)).max()
            relation = basis @ dense @ basis.T - tridiag  # V A V^T = T in exact arithmetic
            ritz = np.linalg.eigvalsh(tridiag)
            top = np.abs(ritz[-5:] - exact[-5:]).max() / scale
            low = abs(ritz[0] - exact[0]) / scale
            print(
                f"{order:>6}{dtype:>12}{k:>7}{ortho:>14.2e}{np.abs(relation).max() / scale:>14.2e}"
                f"{top:>15.2e}{low:>13.2e}"
            )


if __name__ == "__main__":
    main()
