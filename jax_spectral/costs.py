"""Cost and memory of a Lanczos or SLQ run, known before it starts.

``estimate(operator, order=m, num_probes=n)`` counts the passes over the data (one per
step; SLQ's probes share them), the Hessian-vector products (one per probe per step) and
the bytes of the Lanczos bases (``n * m * dim`` entries of the recurrence's dtype), in all
and per device under a ``basis_sharding``. :func:`jax_spectral.lanczos` and
:func:`jax_spectral.slq` call :func:`check_fits` before allocating anything: a basis larger
than the memory available on one device is refused with ``MemoryError``, saying what would
fit (sharding the basis over the devices, fewer probes at a time, or a lower order). For
several probes of a curvature operator it also says how many probes' products run at a
time (:func:`jax_spectral.operators.tangent_chunk`), which bounds their working memory.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._processes import operand_mesh, smallest
from .validate import count

__all__ = ["CostEstimate", "check_fits", "estimate"]

USABLE_FRACTION = 0.8  # of the free memory: the HVP and the rest of the state need room too


LINEARIZE_FRACTION = 0.25  # of the memory left beside the bases: cached linearisations


def prepared(operand: Any, cost: CostEstimate, on_host: bool = False) -> Any:
    """``operand`` ready for the run that ``cost`` describes: a curvature operator with
    each batch's product linearised once (:meth:`CurvatureOperator.linearized`) when the
    run takes more than one pass and what that keeps fits in ``LINEARIZE_FRACTION`` of the
    memory left beside the bases; any other operand as it is."""
    from .linop import DeflatedOperator
    from .operators import CurvatureOperator

    # Only the library's own operators: a user's class may have a method of that name
    # that means something else (a static wrapper would pass the lookup through to it).
    if not isinstance(operand, (CurvatureOperator, DeflatedOperator)) or cost.passes < 2:
        return operand
    linearized = operand.linearized
    if on_host or cost.free_bytes is None:  # the bases are not where the products run
        return linearized()
    room = cost.free_bytes - cost.basis_bytes_per_device
    return linearized(budget=int(LINEARIZE_FRACTION * max(room, 0)))


class CostEstimate(NamedTuple):
    """What a run will cost (see :func:`estimate`)."""

    passes: int  # passes over the data (Lanczos steps)
    hvps: int  # Hessian-vector products: passes x probes
    basis_bytes: int  # all Lanczos bases together
    basis_bytes_per_device: int  # the largest share of one device
    devices: int  # devices the basis is spread over
    free_bytes: int | None  # memory free on one device (None when unknown)
    dtype: str = "float32"  # the recurrence's dtype, which sets the basis's bytes per entry
    # probes whose products one vmapped batch product takes at a time (the working memory
    # grows with it; see CurvatureOperator.matmat); None: one probe, or not an operator
    # with in-memory batches
    probe_chunk: int | None = None

    @property
    def fits(self) -> bool:
        if self.free_bytes is None:
            return True
        return self.basis_bytes_per_device <= USABLE_FRACTION * self.free_bytes

    def __str__(self) -> str:
        free = "unknown" if self.free_bytes is None else _size(self.free_bytes)
        return (
            f"{self.passes} passes over the data, {self.hvps} Hessian-vector products, "
            f"Lanczos bases {_size(self.basis_bytes)} in {self.dtype} "
            f"({_size(self.basis_bytes_per_device)} "
            f"on each of {self.devices} device(s); free: {free})"
            + (
                f"; the probes' products run {self.probe_chunk} at a time to bound memory"
                if self.probe_chunk is not None
                else ""
            )
        )


def _size(nbytes: float) -> str:
    if nbytes < 1024:
        return f"{int(nbytes)} B"
    for unit in ("KiB", "MiB", "GiB"):
        nbytes /= 1024
        if nbytes < 1024:
            return f"{nbytes:.1f} {unit}"
    return f"{nbytes / 1024:.1f} TiB"


def free_device_bytes(device: Any = None) -> int | None:
    """Free memory of ``device`` (default: the first): from the accelerator's allocator,
    or the host's available physical memory for a CPU device; ``None`` when unknown."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    if device.platform == "cpu":
        return _available_host_bytes()
    return None


def _available_host_bytes() -> int | None:
    """Memory the OS can hand out without swapping: ``MemAvailable`` (free memory plus
    reclaimable caches), not ``MemFree``, which leaves out the page cache."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # not Linux: free pages only
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return None


def estimate(
    operator: Any,
    *,
    order: int,
    num_probes: int = 1,
    dtype: Any = None,
    recurrence_dtype: Any = None,
    basis_sharding: jax.sharding.Sharding | None = None,
    on_host: bool = False,
) -> CostEstimate:
    """Passes, products and basis bytes of ``num_probes`` Lanczos runs of ``order`` steps.

    ``operator`` is an operator (``dim`` and ``dtype`` from it) or the dimension as an int
    (then give ``dtype``; default float32). The recurrence's dtype is the operator's
    promoted to at least float32, as in :func:`jax_spectral.lanczos`, unless
    ``recurrence_dtype`` says otherwise: ``"float64"`` for a float64 recurrence on float32
    products doubles the basis. ``on_host``: the bases live in host memory
    (``slq(basis_memory="host")``), so the free memory is the host's.
    """
    order, num_probes = count("order", order), count("num_probes", num_probes)
    if isinstance(operator, (int, np.integer)):
        dim, base = int(operator), dtype or jnp.float32
    else:
        from .linop import check_operator, dtype_of

        check_operator(operator)
        dim, base = int(operator.dim), dtype or dtype_of(operator)
    recurrence = np.dtype(jnp.promote_types(base, jnp.float32))
    if recurrence_dtype is not None:
        recurrence = np.dtype(recurrence_dtype)
    itemsize = recurrence.itemsize
    total = int(num_probes) * int(order) * dim * itemsize
    devices = 1
    if basis_sharding is not None:
        from .lanczos import column_padding

        devices = len(basis_sharding.device_set)
        padded = dim + column_padding(basis_sharding, dim)  # zero columns that make it divide
        shard = basis_sharding.shard_shape((int(order), padded))  # each probe's (order, dim)
        per_device = int(num_probes) * int(np.prod(shard)) * itemsize
    else:
        per_device = total
    free = free_device_bytes(jax.local_devices(backend="cpu")[0] if on_host else None)
    if operand_mesh(operator) is not None:  # several processes decide alike: the least
        free = smallest(free)
    return CostEstimate(
        passes=int(order),
        hvps=int(order) * int(num_probes),
        basis_bytes=total,
        basis_bytes_per_device=per_device,
        devices=devices,
        free_bytes=free,
        dtype=recurrence.name,
        probe_chunk=_probe_chunk(operator, int(num_probes)),
    )


def _probe_chunk(operator: Any, num_probes: int) -> int | None:
    """:func:`jax_spectral.operators.tangent_chunk` for a curvature operator's probes."""
    from .operators import CurvatureOperator, tangent_chunk

    if num_probes < 2 or not isinstance(operator, CurvatureOperator) or operator.stream is not None:
        return None
    return tangent_chunk(operator, num_probes)


def check_fits(cost: CostEstimate, *, num_probes: int = 1, on_host: bool = False) -> None:
    """Raise ``MemoryError`` when the basis cannot fit, naming what would."""
    if cost.fits:
        return
    budget = USABLE_FRACTION * cost.free_bytes
    options = []
    host = free_device_bytes(jax.local_devices(backend="cpu")[0])
    if num_probes > 1 and not on_host and host and cost.basis_bytes <= USABLE_FRACTION * host:
        options.append("keep the bases in host memory (slq(..., basis_memory='host'))")
    count = jax.device_count()
    if cost.devices == 1 and count > 1 and cost.basis_bytes / count <= budget:
        options.append(
            f"shard the basis over the {count} devices (basis_sharding=NamedSharding(mesh, "
            f"PartitionSpec(None, 'data')): {_size(cost.basis_bytes / count)} each)"
        )
    if num_probes > 1 and cost.basis_bytes_per_device / num_probes <= budget:
        fit = max(1, int(budget // (cost.basis_bytes_per_device / num_probes)))
        options.append(f"run at most {fit} probes at a time (several slq calls)")
    if cost.dtype == "float64" and cost.basis_bytes_per_device / 2 <= budget:
        options.append(
            "run the recurrence in float32 on float32 products (recurrence_dtype='float32', "
            "half the basis)"
        )
    steps = int(budget // (cost.basis_bytes_per_device / cost.passes))
    if steps >= 1:
        options.append(f"use order <= {steps}")
    raise MemoryError(
        f"the Lanczos basis needs {_size(cost.basis_bytes_per_device)} per device but about "
        f"{_size(budget)} is usable ({_size(cost.free_bytes)} free). "
        + ("It would fit if you " + "; or ".join(options) + "." if options else "")
    )
