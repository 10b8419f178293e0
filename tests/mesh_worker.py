"""Data-parallel operator and sharded Lanczos basis on 4 forced CPU devices.

Run by tests/test_mesh.py in a subprocess (the device count is fixed when JAX starts):
prints one JSON object comparing the 4-device results with one device.
"""

import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from conftest import classification_data, init_mlp, mlp_apply, mlp_loss  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jax_spectral import estimate, hessian_operator, lanczos, slq  # noqa: E402


def main():
    assert jax.device_count() == 4, jax.devices()
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    params = init_mlp(jax.random.key(0), [6, 12, 4], dtype)  # 136 = 4 x 34 parameters
    x, y = classification_data(jax.random.key(1), 70, 6, 4, dtype)  # batches: 4 x 16, 6
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    one = hessian_operator(mlp_loss, params, (x, y), batch_size=16)
    four = hessian_operator(mlp_loss, params, (x, y), batch_size=16, mesh=mesh)
    key = jax.random.key(2)
    order = 30
    single = lanczos(one, key, order)
    basis_sharding = NamedSharding(mesh, P(None, "data"))
    reports = {"lanczos": [], "slq": []}  # progress on a mesh: reported from the host

    def report(name):
        return lambda done, total, elapsed: reports[name].append((done, total))

    sharded = lanczos(four, key, order, basis_sharding=basis_sharding, progress=report("lanczos"))
    resumed, interrupted_at = _sharded_checkpoint(four, key, order, basis_sharding)
    odd = _indivisible(dtype, mesh, key, order, basis_sharding)
    probes_one = slq(one, key, num_probes=3, order=order).lanczos.tridiag
    probes_four = slq(four, key, num_probes=3, order=order, progress=report("slq"))
    probes_four = probes_four.lanczos.tridiag

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.abs(a - b).max() / np.abs(b).max())

    stacked = jax.tree_util.tree_leaves(four.stacked)[0]
    ones = np.ones(one.dim, dtype)
    print(
        json.dumps(
            {
                "dim": one.dim,
                "tridiag_rel": rel(sharded.tridiag, single.tridiag),
                "eig_rel": rel(
                    np.linalg.eigvalsh(np.asarray(sharded.tridiag, np.float64)),
                    np.linalg.eigvalsh(np.asarray(single.tridiag, np.float64)),
                ),
                "slq_rel": rel(probes_four, probes_one),
                "matvec_rel": rel(four.matvec(ones), one.matvec(ones)),
                "data_shards": sorted({tuple(s.data.shape) for s in stacked.addressable_shards}),
                "data_devices": len({s.device for s in stacked.addressable_shards}),
                "basis_spec": str(sharded.basis.sharding.spec),
                "basis_shards": sorted(
                    {tuple(s.data.shape) for s in sharded.basis.addressable_shards}
                ),
                "basis_bytes_per_device": max(
                    s.data.nbytes for s in sharded.basis.addressable_shards
                ),
                "basis_bytes": int(sharded.basis.nbytes),
                "estimate_per_device": estimate(
                    four, order=order, basis_sharding=basis_sharding
                ).basis_bytes_per_device,
                "explicit_refused": _explicit_refused(params, x, y),
                **_remainder_split(four, params, x, y, mesh),
                **_data_by_model(params, x, y, single, one, key, order),
                **odd,
                "checkpoint_rel": rel(resumed.tridiag, single.tridiag),
                "checkpoint_interrupted_at": interrupted_at,
                "checkpoint_spec": str(resumed.basis.sharding.spec),
                "progress_last": {
                    name: calls[-1] if calls else None for name, calls in reports.items()
                },
            }
        )
    )


def _indivisible(dtype, mesh, key, order, basis_sharding):
    """A model of 123 parameters, which 4 devices do not divide: the sharded basis is
    padded with zero columns, and the results are those of one device."""
    from jax_spectral import eigenpairs, ritz, slq

    params = init_mlp(jax.random.key(0), [6, 12, 3], dtype)  # 123 parameters
    data = classification_data(jax.random.key(1), 70, 6, 3, dtype)
    one = hessian_operator(mlp_loss, params, data, batch_size=16)
    four = hessian_operator(mlp_loss, params, data, batch_size=16, mesh=mesh)
    single = lanczos(one, key, order)
    sharded = lanczos(four, key, order, basis_sharding=basis_sharding)
    pairs_one = eigenpairs(one, key, 3, order=order)
    pairs_four = eigenpairs(four, key, 3, order=order, basis_sharding=basis_sharding)
    _, vectors = ritz(sharded, like=params)

    def flat(vectors):  # (k, dim) from params-shaped vectors with a leading k axis
        return np.asarray(jax.vmap(lambda tree: ravel_pytree(tree)[0])(vectors), np.float64)

    overlaps = np.abs(np.sum(flat(pairs_one.vectors) * flat(pairs_four.vectors), axis=1))
    probes_one = slq(one, key, order, num_probes=3)
    probes_four = slq(four, key, order, num_probes=3, basis_sharding=basis_sharding)
    bases = probes_four.lanczos.basis
    return {
        "odd_slq_rel": float(
            np.abs(
                np.asarray(probes_four.lanczos.tridiag) - np.asarray(probes_one.lanczos.tridiag)
            ).max()
            / np.abs(np.asarray(probes_one.lanczos.tridiag)).max()
        ),
        "odd_slq_shards": sorted({tuple(s.data.shape) for s in bases.addressable_shards}),
        "odd_slq_padding_zero": not np.any(np.asarray(bases)[..., one.dim :]),
        "odd_slq_estimate_per_device": estimate(
            four, order=order, num_probes=3, basis_sharding=basis_sharding
        ).basis_bytes_per_device,
        "odd_dim": one.dim,
        "odd_tridiag_rel": float(
            np.abs(np.asarray(sharded.tridiag) - np.asarray(single.tridiag)).max()
            / np.abs(np.asarray(single.tridiag)).max()
        ),
        "odd_basis_shape": list(sharded.basis.shape),
        "odd_basis_shards": sorted({tuple(s.data.shape) for s in sharded.basis.addressable_shards}),
        "odd_padding_zero": not np.any(np.asarray(sharded.basis)[:, one.dim :]),
        "odd_ritz_leaf_shape": list(vectors["layer1"]["w"].shape),
        "odd_eig_rel": float(
            np.abs(pairs_four.values - pairs_one.values).max() / np.abs(pairs_one.values).max()
        ),
        "odd_residuals": pairs_four.residuals.tolist(),
        "odd_estimate_per_device": estimate(
            four, order=order, basis_sharding=basis_sharding
        ).basis_bytes_per_device,
        "odd_vector_overlap": float(overlaps.min()),
    }


def _sharded_checkpoint(op, key, order, basis_sharding):
    """A checkpointed run with a sharded basis, stopped by Ctrl-C after step 10 and resumed."""
    import signal
    import tempfile

    from jax_spectral import Interrupted

    folder = tempfile.mkdtemp()
    sent = []

    def ctrl_c_at_10(done, total, elapsed):
        if done >= 10 and not sent:
            sent.append(done)
            os.kill(os.getpid(), signal.SIGINT)

    options = dict(basis_sharding=basis_sharding, checkpoint=folder, checkpoint_every=5)
    try:
        lanczos(op, key, order, progress=ctrl_c_at_10, **options)
        stopped = None
    except Interrupted as err:
        stopped = err.steps
    return lanczos(op, key, order, resume=True, **options), stopped


def _centred_loss(params, batch):
    """A loss with a batch statistic (logits centred on the batch's mean): regrouping the
    samples changes it, so a remainder batch must stay whole."""
    x, y = batch
    logits = mlp_apply(params, x)
    logp = jax.nn.log_softmax(logits - jnp.mean(logits, axis=0))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def _remainder_split(four, params, x, y, mesh):
    """The 6-sample remainder on 4 devices: 4 samples split over them, a tail of 2
    replicated; kept whole where the loss has a batch statistic."""
    head = jax.tree_util.tree_leaves(four.remainder)[0]
    tail = jax.tree_util.tree_leaves(four.tail)[0]
    one = hessian_operator(_centred_loss, params, (x, y), batch_size=16)
    centred = hessian_operator(_centred_loss, params, (x, y), batch_size=16, mesh=mesh)
    v = jax.random.normal(jax.random.key(5), (one.dim,), one.dtype)
    whole = np.asarray(one.matvec(v), np.float64)

    def rel_to_one(loss, params, data, **options):
        ones = np.ones(one.dim, one.dtype)
        a = hessian_operator(loss, params, data, **options)
        b = hessian_operator(loss, params, data, mesh=mesh, **options)
        got = np.asarray(b.matvec(ones), np.float64)
        want = np.asarray(a.matvec(ones), np.float64)
        return b, float(np.abs(got - want).max() / np.abs(want).max())

    # A penalty on the batch-mean logit at a zero output layer: its value and gradient
    # vanish, its Hessian does not and depends on which samples share a batch.
    flat = {**params, "layer1": jax.tree_util.tree_map(jnp.zeros_like, params["layer1"])}

    def hidden(params, batch):
        return mlp_loss(params, batch) + jnp.sum(jnp.mean(mlp_apply(params, batch[0]), 0) ** 2)

    hidden_op, hidden_rel = rel_to_one(hidden, flat, (x, y), batch_size=16)
    # A per-batch leaf that is not a sample axis (weights of 8 per batch; the last batch
    # has 6 samples): it goes whole into both parts of the cut remainder.
    w = np.arange(8, dtype=np.asarray(x).dtype)
    batches = [(x[i : i + 16], y[i : i + 16], w) for i in range(0, 70, 16)]

    def weighted(params, batch):
        return mlp_loss(params, batch[:2]) * jnp.mean(batch[2])

    weighted_op, weighted_rel = rel_to_one(weighted, params, batches)
    return {
        "hidden_tail": hidden_op.tail is not None,
        "hidden_matvec_rel": hidden_rel,
        "weighted_tail_shapes": [
            list(a.shape) for a in jax.tree_util.tree_leaves(weighted_op.tail)
        ],
        "weighted_matvec_rel": weighted_rel,
        "cli_batch_size": _cli_bad_batch_size(),
        "remainder_shards": sorted({tuple(s.data.shape) for s in head.addressable_shards}),
        "tail_shape": list(tail.shape),
        "tail_replicated": bool(tail.sharding.is_fully_replicated),
        "centred_tail": centred.tail is not None,
        "centred_remainder_replicated": bool(
            jax.tree_util.tree_leaves(centred.remainder)[0].sharding.is_fully_replicated
        ),
        "centred_matvec_rel": float(
            np.abs(np.asarray(centred.matvec(v), np.float64) - whole).max() / np.abs(whole).max()
        ),
    }


def _data_by_model(params, x, y, single, one, key, order):
    """A 2 x 2 mesh (data x model), the parameters split over the model axis (FSDP-style):
    the operator keeps their layout, each device holding half of every weight; the basis
    split over all four devices; the results those of one device."""
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

    def split(leaf):  # the last axis over "model" (12 and 4 outputs per layer)
        spec = P(*([None] * (leaf.ndim - 1)), "model")
        return jax.device_put(leaf, NamedSharding(mesh, spec))

    sharded = jax.tree_util.tree_map(split, params)
    op = hessian_operator(mlp_loss, sharded, (x, y), batch_size=16, mesh=mesh)
    basis_sharding = NamedSharding(mesh, P(None, ("data", "model")))
    result = lanczos(op, key, order, basis_sharding=basis_sharding)
    ones = np.ones(one.dim, one.dtype)
    w = op.params["layer0"]["w"]
    batch = jax.tree_util.tree_leaves(op.stacked)[0]

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.abs(a - b).max() / np.abs(b).max())

    return {
        "fsdp_param_spec": str(w.sharding.spec),
        "fsdp_param_shards": sorted({tuple(s.data.shape) for s in w.addressable_shards}),
        "fsdp_batch_shards": sorted({tuple(s.data.shape) for s in batch.addressable_shards}),
        "fsdp_basis_shards": sorted({tuple(s.data.shape) for s in result.basis.addressable_shards}),
        "fsdp_matvec_rel": rel(op.matvec(ones), one.matvec(ones)),
        "fsdp_tridiag_rel": rel(result.tridiag, single.tridiag),
    }


def _cli_bad_batch_size():
    """``jax-spectral demo --data-parallel`` with a batch size 4 devices do not divide:
    one line on stderr, exit code 2."""
    import contextlib
    import io
    import tempfile

    from jax_spectral.cli import main as cli

    err = io.StringIO()
    argv = ["demo", "--data-parallel", "--batch-size", "510", "--train-steps", "2", "--quiet"]
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli(argv + ["--out", tempfile.mkdtemp()])
    return [code, err.getvalue()]


def _explicit_refused(params, x, y):
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    try:
        hessian_operator(mlp_loss, params, (x, y), batch_size=16, mesh=mesh)
    except ValueError as err:
        return "Auto axes" in str(err)
    return False


if __name__ == "__main__":
    if "--x64" in sys.argv:
        jax.config.update("jax_enable_x64", True)
    main()
