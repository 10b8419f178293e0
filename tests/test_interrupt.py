"""Ctrl-C (SIGINT) during a long run: it stops within about a step, keeps the finished
steps (the same numbers as an uninterrupted run) and, with a checkpoint folder, resumes."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from interrupt_worker import ORDER, run

from jax_spectral import Interrupted
from jax_spectral.interrupt import watch

pytestmark = pytest.mark.slow  # SIGINT to subprocesses


WORKER = Path(__file__).with_name("interrupt_worker.py")


def _interrupt(*args, after=4):
    """Start the worker, send SIGINT once ``after`` steps are reported; return the
    result it printed, its exit code, stderr, the seconds from the signal to the exit
    and the longest time one step took."""
    child = subprocess.Popen(
        [sys.executable, str(WORKER), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    times, result = [], None
    for line in child.stdout:
        if line.startswith("step "):
            done, seconds = line.split()[1:]
            times.append((int(done), float(seconds)))
            if int(done) >= after and not hasattr(child, "signalled"):
                child.send_signal(signal.SIGINT)
                child.signalled = time.perf_counter()
        elif line.startswith("result "):
            result = json.loads(line[len("result ") :])
    code = child.wait(timeout=300)
    waited = time.perf_counter() - child.signalled
    pairs = zip(times[:-1], times[1:], strict=True)
    per_step = max((t1 - t0) / (d1 - d0) for (d0, t0), (d1, t1) in pairs)
    return result, code, child.stderr.read(), waited, per_step


@pytest.mark.parametrize(
    "kind, loop", [("lanczos", "scan"), ("lanczos", "host"), ("slq", "scan"), ("slq", "host")]
)
def test_ctrl_c_stops_within_a_step_and_keeps_the_finished_steps(kind, loop):
    result, code, err, waited, per_step = _interrupt(kind, loop)
    assert code == 130, err
    print(f"stopped {waited:.2f} s after SIGINT; a step took up to {per_step:.3f} s")
    assert waited <= 2 * per_step + 5, (waited, per_step)
    assert "Traceback" not in err
    k = result["steps"]
    assert 4 <= k < ORDER and result["total"] == ORDER
    assert f"after {k} of {ORDER} steps" in result["message"]
    tridiag = np.asarray(result["tridiag"])
    if kind == "slq":
        assert result["num_steps"] == [k, k]
        tridiag = tridiag[0]
    # The finished steps are those of an uninterrupted run; nothing past them is set.
    full = np.asarray(run(kind, loop).padded_tridiag())
    full = full[0] if kind == "slq" else full
    np.testing.assert_allclose(tridiag[:k, :k], full[:k, :k], rtol=1e-5, atol=1e-6)
    assert not np.any(tridiag[k:]) and not np.any(tridiag[:, k:])


def test_an_interrupted_checkpointed_run_resumes_to_the_uninterrupted_result(tmp_path):
    folder = tmp_path / "ckpt"
    result, code, err, _, _ = _interrupt("lanczos", "scan", folder, after=3)
    assert code == 130, err
    assert "resume=True" in result["message"]
    seen = []
    resumed = run("lanczos", "scan", folder, resume=True, progress=lambda *s: seen.append(s[0]))
    assert seen[0] >= result["steps"]  # saved at the interrupt: nothing is computed again
    plain = run("lanczos", "scan")
    np.testing.assert_allclose(
        np.asarray(resumed.tridiag), np.asarray(plain.tridiag), rtol=1e-5, atol=1e-6
    )


def test_the_watch_turns_the_first_ctrl_c_into_a_flag_and_the_second_into_an_interrupt():
    import os

    with watch() as outer, watch() as inner:
        assert inner is outer  # nested loops share one flag
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert outer.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert issubclass(Interrupted, KeyboardInterrupt)
