"""What the processes of a multi-process run (``jax.distributed``) must agree on.

In multi-controller JAX every process runs the same program and the collectives inside it
pair up in order, so any choice that changes a compiled program or the sequence of calls
(a segment's length, a chunk size read from free memory, whether to resume, whether to
raise) must come out the same on every process. These helpers gather one small value from
each process; they are collectives themselves, so every process must call them at the
same point.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def operand_mesh(operand: Any) -> Any:
    """The mesh of an operator whose arrays span several processes (``None`` otherwise:
    on one process, JAX moves a start vector to the operator's devices itself)."""
    for leaf in jax.tree_util.tree_leaves(operand):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and not leaf.is_fully_addressable:
            return sharding.mesh
    return None


def global_array(x: Any, sharding: Any) -> jax.Array:
    """The host array ``x`` laid out as ``sharding``, each process providing its own
    shards (on several processes ``jax.device_put`` cannot place host data)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicate(mesh: Any, tree: Any) -> Any:
    """``tree``'s arrays replicated over ``mesh`` (on several processes each provides its
    own copy, which must be the same)."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree_util.tree_map(lambda a: global_array(a, sharding), tree)


def gather(values: Any) -> np.ndarray:
    """Every process's ``values`` (small integers), stacked along a leading axis in
    process order."""
    from jax.experimental import multihost_utils

    mine = np.asarray(values, np.int64).reshape(-1)
    return np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, mine.size)


def smallest(value: int | None) -> int | None:
    """The smallest of every process's ``value`` (``None`` if any process has none)."""
    everyone = gather(-1 if value is None else int(value))[:, 0]
    return None if np.any(everyone < 0) else int(everyone.min())


def all_ok(ok: bool) -> np.ndarray:
    """Which processes report ``ok``, as a boolean array in process order."""
    return gather(int(bool(ok)))[:, 0].astype(bool)
