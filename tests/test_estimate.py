"""The cost estimate matches what runs allocate; a basis that cannot fit is refused early."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import classification_data, init_mlp, mlp_loss

import jax_spectral.costs as estimate_module
from jax_spectral import estimate, hessian_operator, lanczos, slq


def _operator():
    params = init_mlp(jax.random.key(0), [5, 9, 3])
    x, y = classification_data(jax.random.key(1), 30, 5, 3)
    return hessian_operator(mlp_loss, params, (x, y), batch_size=8)


@pytest.mark.slow
def test_estimate_matches_the_bases_that_runs_allocate():
    op = _operator()
    one = estimate(op, order=12)
    assert one.basis_bytes == lanczos(op, jax.random.key(0), 12).basis.nbytes
    many = estimate(op, order=12, num_probes=4)
    probes = slq(op, jax.random.key(0), num_probes=4, order=12)
    assert many.basis_bytes == probes.lanczos.basis.nbytes
    assert (many.passes, many.hvps) == (12, 48) and many.fits
    half = estimate(op.dim, order=12, dtype=jnp.bfloat16)  # the recurrence runs in float32
    assert half.basis_bytes == 12 * op.dim * 4
    assert "12 passes over the data, 48 Hessian-vector products" in str(many)
    assert "in float32" in str(many)
    wide = estimate(op, order=12, recurrence_dtype="float64")  # float32 products
    assert wide.basis_bytes == 2 * one.basis_bytes and wide.dtype == "float64"
    assert "in float64" in str(wide)
    run = lanczos(op, jax.random.key(0), 12, recurrence_dtype="float64")
    assert wide.basis_bytes == run.basis.nbytes


def test_a_float64_basis_that_cannot_fit_is_refused(monkeypatch):
    op = _operator()
    need = estimate(op, order=20).basis_bytes  # float32
    monkeypatch.setattr(estimate_module, "free_device_bytes", lambda device=None: int(1.5 * need))
    lanczos(op, jax.random.key(0), 20)  # fits in float32
    with pytest.raises(MemoryError, match="the Lanczos basis needs"):
        lanczos(op, jax.random.key(0), 20, recurrence_dtype="float64")


def test_a_basis_that_cannot_fit_is_refused_before_any_product(monkeypatch):
    op = _operator()
    need = estimate(op, order=20, num_probes=5).basis_bytes
    monkeypatch.setattr(estimate_module, "free_device_bytes", lambda device=None: need // 3)
    calls = []

    def counted(v):
        calls.append(1)
        return op.matvec(v)

    with pytest.raises(MemoryError, match=r"use order <= \d+"):
        lanczos(counted, jax.random.key(0), 20 * 5, dim=op.dim, loop="host")
    with pytest.raises(MemoryError, match="probes at a time") as info:
        slq(op, jax.random.key(0), num_probes=5, order=20)
    assert calls == [] and "usable" in str(info.value)
    fits = estimate(op, order=20)  # one probe fits in a third of the five-probe bases
    assert fits.fits and np.isclose(fits.basis_bytes * 5, need)


def test_free_host_memory_is_what_the_os_calls_available_and_bad_counts_are_refused():
    with open("/proc/meminfo") as meminfo:
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in meminfo}
    got = estimate_module.free_device_bytes(jax.devices("cpu")[0])
    # MemAvailable moves a little between the two reads; MemFree leaves out the page cache.
    assert abs(got - fields["MemAvailable"]) < 0.05 * fields["MemAvailable"]
    op = _operator()
    for bad in (-5, 0, 2.5, True):
        with pytest.raises(ValueError, match="order must be a positive int"):
            estimate(op, order=bad)
    with pytest.raises(ValueError, match="num_probes must be a positive int"):
        estimate(op, order=3, num_probes=0)
