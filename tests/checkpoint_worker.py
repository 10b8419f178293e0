"""Run a checkpointed Lanczos or SLQ and kill this process with SIGKILL at a given step.

    python checkpoint_worker.py FOLDER {lanczos,slq} {scan,host} KILL_AT

Used by tests/test_checkpoint.py; the problem is `problem()` below, shared with the test.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
from conftest import classification_data, init_mlp, mlp_loss  # noqa: E402

from jax_spectral import hessian_operator, lanczos, slq  # noqa: E402

ORDER, EVERY = 24, 5


def problem(loop):
    params = init_mlp(jax.random.key(0), [6, 12, 4])
    x, y = classification_data(jax.random.key(1), 45, 6, 4)
    return hessian_operator(mlp_loss, params, (x, y), batch_size=10, loop=loop)


def run(folder, kind, loop, progress=False, resume=False):
    op = problem(loop)
    options = dict(checkpoint=folder, checkpoint_every=EVERY, resume=resume, progress=progress)
    if kind == "lanczos":
        return lanczos(op, jax.random.key(2), ORDER, **options).tridiag
    return slq(op, jax.random.key(2), num_probes=3, order=ORDER, **options).lanczos.tridiag


if __name__ == "__main__":
    folder, kind, loop, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    def die(done, total, seconds):
        if done >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    run(folder, kind, loop, progress=die)
    sys.exit(3)  # not reached when the kill works
