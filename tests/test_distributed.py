"""Several processes for real: 2 processes x 2 CPU devices joined by jax.distributed (gloo
collectives on localhost), each passing its own half of the data, against one device."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two subprocesses that start JAX and connect

WORKER = Path(__file__).with_name("distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _run_two(tmp_path, *extra, returncode=0):
    port = str(_free_port())
    outs = [tmp_path / f"process{i}-{'-'.join(extra[:1])}.json" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), port, str(outs[i]), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=600))
    finally:
        for proc in procs:
            proc.kill()
    for proc, (_, err) in zip(procs, logs, strict=True):
        assert proc.returncode == returncode, err[-3000:]
    if returncode:
        return None
    return [
        json.loads(out.read_text()) | {"stderr": err}
        for out, (_, err) in zip(outs, logs, strict=True)
    ]


def test_two_processes_with_their_own_data_give_the_one_device_results(tmp_path):
    results = _run_two(tmp_path)
    for got in results:
        assert got["processes"] == 2 and got["devices"] == 4
        # each process passed 35 samples: batches of 16 (8 from each), 6 left over
        assert got["num_samples"] == 70 and got["batch_size"] == 16
        assert got["local_batch_shards"] == [[4, 4, 6]]  # 4 of each batch's 16 per device
        # the remainder, 3 samples on each process: 1 per device, the last 2 on every device
        assert got["remainder_shards"] == [[1, 6]] and got["tail_shape"] == [2, 6]
        for name in (
            "lanczos",
            "lanczos_progress",
            "lanczos_sharded_basis",
            "slq",
            "slq_sharded_bases",
            "eigenpairs",
            "hutchinson",
            "hutchpp",
            "matvec",
            "indivisible_sharded_basis",
            "fsdp_lanczos",
            "ggn_matvec",
            "fisher_matvec",
        ):
            assert isinstance(got[name], float), (name, got[name])
            assert got[name] <= 1e-5, (name, got[name])
        assert got["progress_last"] == [30, 30]
        # data x model, the weights split over "model" within each process
        assert got["fsdp_param_shards"] == [[6, 6]]
        assert "passed different parameters" in got["different_params"]
        assert "passed different parameters" in got["different_sizes"]
        assert "passed different parameters" in got["different_global_params"]
        assert "must lie within one process" in got["processes_across_data"]
        assert "passed different start vectors" in got["different_keys"]
    assert "lanczos: 100%" in results[0]["stderr"]  # the bar draws on process 0 only
    assert "lanczos:" not in results[1]["stderr"]


def test_both_processes_killed_resume_from_their_checkpoints(tmp_path):
    folder = str(tmp_path / "run")
    _run_two(tmp_path, "kill", folder, returncode=3)  # both exit at step 15
    # each process wrote its own copy; the last save before the kill was step 10
    for i in range(2):
        assert (tmp_path / "run" / f"process-{i}-of-2" / "state.npz").is_file()
    for got in _run_two(tmp_path, "resume", folder):
        assert got["rel"] <= 1e-5
        assert got["reports"][0] == 10 and got["reports"][-1] == 30  # continued from 10
    # Process 1 one save behind (killed while writing its last state): both go back to
    # the step they both hold, and the result is the same.
    for _ in range(2):  # twice: a run resumed from its previous state keeps that one
        for got in _run_two(tmp_path, "skew", folder):
            assert got["rel"] <= 1e-5
            assert got["reports"][0] == 25 and got["reports"][-1] == 30
    # Process 1's data changed: its copy refuses, and process 0 raises too (not waits).
    errors = [got["error"] for got in _run_two(tmp_path, "perturbed", folder)]
    assert "written for different operator" in errors[1]
    assert "process(es) [1] could not read their checkpoint" in errors[0]
    # The basis split over the 4 devices of both processes: each saves its own columns
    folder = str(tmp_path / "sharded")
    _run_two(tmp_path, "kill-sharded", folder, returncode=3)
    for got in _run_two(tmp_path, "resume-sharded", folder):
        assert got["rel"] <= 1e-5 and got["basis_shards"] == [[30, 34]]
        assert got["reports"][0] == 10 and got["reports"][-1] == 30


def test_the_command_line_on_two_processes_writes_once_and_matches_dense_eigenvalues(tmp_path):
    """``jax-spectral demo --distributed`` in 2 processes x 2 devices: process 0 writes the
    files (process 1 none), and the top eigenvalues are those of the dense Hessian on the
    samples the two shares hold (1,796 of the 1,797 digits)."""
    import os

    import jax
    import numpy as np
    from jax.flatten_util import ravel_pytree

    from jax_spectral.cli import _train_digits_mlp

    port = str(_free_port())
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    settings = ["--order", "20", "--num-probes", "2", "--top", "2", "--trace-matvecs", "9"]
    settings += ["--train-steps", "30", "--batch-size", "256", "--quiet"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "jax_spectral", "demo", *settings, "--out"]
            + [str(tmp_path / f"out{i}"), "--distributed", "--coordinator", f"localhost:{port}"]
            + ["--num-processes", "2", "--process-id", str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    try:
        logs = [proc.communicate(timeout=600) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, (out, err) in zip(procs, logs, strict=True):
        assert proc.returncode == 0, (out, err[-3000:])
    assert not (tmp_path / "out1").exists()  # process 1 wrote nothing
    assert "top eigenvalues" in logs[0][0] and "top eigenvalues" not in logs[1][0]
    summary = json.loads((tmp_path / "out0" / "spectrum.json").read_text())
    assert summary["status"]["complete"] and summary["num_samples"] == 1796
    assert "the last 1 are not used" in " ".join(summary["adjustments"])

    trained, _ = _train_digits_mlp(0, 30)
    flat, unravel = ravel_pytree(trained.params)
    x, y = trained.X[:1796], trained.y[:1796]
    hessian = jax.hessian(lambda w: trained.loss(unravel(w), (x, y)))(flat)
    dense = np.linalg.eigvalsh(np.asarray(hessian, np.float64))[::-1][:2]
    got = np.asarray(summary["top_eigenvalues"])
    np.testing.assert_allclose(got, dense, rtol=1e-4)
