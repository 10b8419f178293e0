"""Data-parallel operator and sharded basis on 4 forced CPU devices, against one device
(in a subprocess: the number of host devices is fixed when JAX starts)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses with 4 forced devices


WORKER = Path(__file__).with_name("mesh_worker.py")


@pytest.mark.parametrize("precision, tol", [("float32", 1e-5), ("float64", 1e-12)])
def test_four_devices_give_the_one_device_tridiagonal(precision, tol):
    argv = [sys.executable, str(WORKER)] + (["--x64"] if precision == "float64" else [])
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    for measure in ("matvec_rel", "tridiag_rel", "eig_rel", "slq_rel"):
        assert got[measure] <= tol, (measure, got[measure])
    # Each of the 4 devices holds a quarter of every batch (4 batches x 4 of 16 samples) ...
    assert got["data_devices"] == 4 and got["data_shards"] == [[4, 4, 6]]
    # ... and a quarter of the basis's columns: order x dim / 4 entries each.
    assert got["basis_spec"] == "P(None, 'data')" and got["basis_shards"] == [[30, 34]]
    assert got["basis_bytes_per_device"] * 4 == got["basis_bytes"]
    assert got["estimate_per_device"] == got["basis_bytes_per_device"]  # known beforehand
    # progress= works with a mesh and a sharded basis, and reaches the end
    assert got["progress_last"] == {"lanczos": [30, 30], "slq": [30, 30]}
    # 123 parameters on 4 devices: the basis padded to 124 columns (31 each, the last zero),
    # the tridiagonal, Ritz values and vectors those of one device
    assert got["odd_dim"] == 123 and got["odd_basis_shape"] == [30, 124]
    assert got["odd_basis_shards"] == [[30, 31]] and got["odd_padding_zero"]
    assert got["odd_estimate_per_device"] == 30 * 31 * (8 if precision == "float64" else 4)
    assert got["odd_tridiag_rel"] <= tol and got["odd_eig_rel"] <= tol
    assert got["odd_ritz_leaf_shape"] == [30, 12, 3]  # ritz(like=params) drops the padding
    assert got["odd_vector_overlap"] >= 1 - 1e3 * tol  # the same top eigenvectors, up to sign
    # slq with the same basis_sharding: every probe's basis split and padded alike
    assert got["odd_slq_rel"] <= tol and got["odd_slq_shards"] == [[3, 30, 31]]
    assert got["odd_slq_padding_zero"]
    assert got["odd_slq_estimate_per_device"] == 3 * got["odd_estimate_per_device"]
    # a checkpointed run with the sharded basis, stopped by Ctrl-C and resumed
    assert got["checkpoint_rel"] <= tol and got["checkpoint_spec"] == "P(None, 'data')"
    assert 10 <= got["checkpoint_interrupted_at"] < 30
    # the 6-sample remainder: 4 samples split over the devices, the other 2 replicated ...
    assert got["remainder_shards"] == [[1, 6]]
    assert got["tail_shape"] == [2, 6] and got["tail_replicated"]
    # ... unless the loss has a batch statistic: then it stays whole (the same matrix)
    assert not got["centred_tail"] and got["centred_remainder_replicated"]
    assert got["centred_matvec_rel"] <= tol
    # ... or a batch term only its second derivatives show (the cut is checked on the product)
    assert not got["hidden_tail"] and got["hidden_matvec_rel"] <= tol
    # a per-batch leaf that is not a sample axis goes whole into both parts
    assert got["weighted_tail_shapes"] == [[2, 6], [2], [8]]
    assert got["weighted_matvec_rel"] <= tol
    code, err = got["cli_batch_size"]
    assert code == 2 and "not a multiple of the 4 devices" in err and len(err.splitlines()) == 1
    # a 2 x 2 mesh, data x model, the parameters split over the model axis: they stay
    # split (each device half of every weight), the data over the data axis, the basis
    # over all four devices, and the numbers are one device's
    assert got["fsdp_param_spec"] == "P(None, 'model')"
    assert got["fsdp_param_shards"] == [[6, 6]]
    assert got["fsdp_batch_shards"] == [[4, 8, 6]]
    assert got["fsdp_basis_shards"] == [[30, 34]]
    assert got["fsdp_matvec_rel"] <= tol and got["fsdp_tridiag_rel"] <= tol
    assert got["explicit_refused"]  # a mesh with Explicit axes gets a clear message
