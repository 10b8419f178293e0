"""Run a long Lanczos or SLQ, reporting each step on stdout, until Ctrl-C.

    python interrupt_worker.py {lanczos,slq} {scan,host} [CHECKPOINT_FOLDER]

Used by tests/test_interrupt.py: on :class:`jax_spectral.Interrupted` it prints the
partial result as JSON and exits 130.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from conftest import classification_data, init_mlp, mlp_loss  # noqa: E402

from jax_spectral import Interrupted, hessian_operator, lanczos, slq  # noqa: E402

ORDER = 200


def problem(loop):
    """A Hessian whose products take a measurable time (about 0.05-0.2 s on 2 cores)."""
    params = init_mlp(jax.random.key(0), [64, 256, 10])
    x, y = classification_data(jax.random.key(1), 16384, 64, 10)
    return hessian_operator(mlp_loss, params, (x, y), batch_size=4096, loop=loop)


def run(kind, loop, checkpoint=None, resume=False, progress=False):
    op = problem(loop)
    options = dict(checkpoint=checkpoint, resume=resume, progress=progress)
    if kind == "lanczos":
        return lanczos(op, jax.random.key(2), ORDER, **options)
    return slq(op, jax.random.key(2), num_probes=2, order=ORDER, **options).lanczos


if __name__ == "__main__":
    kind, loop = sys.argv[1], sys.argv[2]
    folder = sys.argv[3] if len(sys.argv) > 3 else None

    def report(done, total, seconds):
        print(f"step {done} {seconds:.3f}", flush=True)

    try:
        run(kind, loop, folder, progress=report)
    except Interrupted as stop:
        result = stop.result if kind == "lanczos" else stop.result.lanczos
        print(
            "result "
            + json.dumps(
                {
                    "steps": stop.steps,
                    "total": stop.total,
                    "message": str(stop),
                    "num_steps": np.asarray(result.num_steps).tolist(),
                    "tridiag": np.asarray(result.padded_tridiag()).tolist(),
                }
            ),
            flush=True,
        )
        sys.exit(130)
    sys.exit(3)  # ran to the end: the interrupt was not seen
