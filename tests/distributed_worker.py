"""One process of a 2-process x 2-device run joined by ``jax.distributed`` (gloo, on this
machine), each process passing only its own half of the data.

Run by tests/test_distributed.py: ``python distributed_worker.py PROCESS_ID PORT OUT
[MODE FOLDER]``; writes one JSON object to ``OUT`` comparing the 4-device results with one
device in the same process (the whole data, no mesh). Modes: ``all`` (every algorithm and
the refusals), ``kill`` (a checkpointed Lanczos that exits at step 15), ``resume`` (resumes
it), ``skew`` (process 1 first goes back to its previous state, as if killed while writing
its last one, then resumes).
"""

import json
import os
import sys
import traceback
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402
from conftest import classification_data, init_mlp, mlp_apply, mlp_loss  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_spectral as js  # noqa: E402

SAMPLES = 70  # 35 a process: 4 batches of 16 (8 from each process) and 3 + 3 left over


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def main(pid: int, port: str, out: str, mode: str = "all", folder: str = "") -> None:
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    params = init_mlp(jax.random.key(0), [6, 12, 4])  # 136 parameters
    x, y = map(np.asarray, classification_data(jax.random.key(1), SAMPLES, 6, 4))
    half = slice(SAMPLES // 2 * pid, SAMPLES // 2 * (pid + 1))
    mine = (x[half], y[half])
    if mode == "perturbed" and pid == 1:  # other data than the checkpoint was written for,
        changed = x[half].copy()  # in a batch that only process 1 holds (not the remainder,
        changed[0] += 1  # whose tail every process holds)
        mine = (changed, y[half])
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    one = js.hessian_operator(mlp_loss, params, (x, y), batch_size=16)  # this process only
    four = js.hessian_operator(mlp_loss, params, mine, batch_size=16, mesh=mesh)
    if mode != "all":
        Path(out).write_text(json.dumps(checkpointed(pid, one, four, mode, folder)))
        return
    got = {
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "num_samples": four.num_samples,
        "batch_size": four.batch_size,
        "local_batch_shards": sorted(
            {
                tuple(s.data.shape)
                for s in jax.tree_util.tree_leaves(four.stacked)[0].addressable_shards
            }  # noqa: E501
        ),
        # each process's 3-sample remainder: 2 split over its devices, 1 in the tail
        "remainder_shards": sorted(
            {
                tuple(s.data.shape)
                for s in jax.tree_util.tree_leaves(four.remainder)[0].addressable_shards
            }
        ),
        "tail_shape": list(jax.tree_util.tree_leaves(four.tail)[0].shape),
    }
    key = jax.random.key(2)
    single = js.lanczos(one, key, 30)
    calls = []
    runs = {
        "lanczos": lambda op: js.lanczos(op, key, 30).tridiag,
        "lanczos_progress": lambda op: (
            js.lanczos(op, key, 30, progress=lambda *a: calls.append(a)).tridiag
        ),
        "lanczos_sharded_basis": lambda op: (
            js.lanczos(op, key, 30, basis_sharding=NamedSharding(mesh, P(None, "data"))).tridiag
            if op is four
            else single.tridiag
        ),
        "slq": lambda op: js.slq(op, key, 30, num_probes=3).lanczos.tridiag,
        "slq_sharded_bases": lambda op: (
            js.slq(
                op, key, 30, num_probes=3, basis_sharding=NamedSharding(mesh, P(None, "data"))
            ).lanczos.tridiag
            if op is four
            else js.slq(op, key, 30, num_probes=3).lanczos.tridiag
        ),
        "eigenpairs": lambda op: js.eigenpairs(op, key, 3, order=40).values,
        "hutchinson": lambda op: js.hutchinson(op, key, num_probes=8).estimate,
        "hutchpp": lambda op: js.hutchpp(op, key, num_matvecs=12).estimate,
        "matvec": lambda op: op.matvec(np.ones(op.dim, np.float32)),
    }
    for name, run in runs.items():
        try:
            got[name] = rel(run(four), run(one))
        except Exception:
            got[name] = traceback.format_exc()
    got["progress_last"] = list(calls[-1][:2]) if calls else None
    try:  # the other curvature operators go through the same engine
        ones = np.ones(one.dim, np.float32)
        for name, build in (("ggn", js.ggn_operator), ("fisher", js.fisher_operator)):
            ops = [
                build(mlp_apply, "softmax_cross_entropy", params, d, batch_size=16, **o)
                for d, o in (((x, y), {}), (mine, {"mesh": mesh}))
            ]
            got[f"{name}_matvec"] = rel(ops[1].matvec(ones), ops[0].matvec(ones))
    except Exception:
        got["ggn_matvec"] = traceback.format_exc()
    try:  # 123 parameters, which the 4 devices do not divide: a padded sharded basis
        odd = init_mlp(jax.random.key(0), [6, 12, 3])
        xo, yo = map(np.asarray, classification_data(jax.random.key(1), SAMPLES, 6, 3))
        sharding = NamedSharding(mesh, P(None, "data"))
        odd_four = js.hessian_operator(
            mlp_loss, odd, (xo[half], yo[half]), batch_size=16, mesh=mesh
        )
        odd_one = js.hessian_operator(mlp_loss, odd, (xo, yo), batch_size=16)
        got["indivisible_sharded_basis"] = rel(
            js.lanczos(odd_four, key, 30, basis_sharding=sharding).tridiag,
            js.lanczos(odd_one, key, 30).tridiag,
        )
    except Exception:
        got["indivisible_sharded_basis"] = traceback.format_exc()
    try:  # data x model, processes along "data", the weights split over "model"
        devices = np.array(sorted(jax.devices(), key=lambda d: (d.process_index, d.id)))
        grid = jax.sharding.Mesh(
            devices.reshape(2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2
        )

        def split(leaf):
            sharding = NamedSharding(grid, P(*([None] * (leaf.ndim - 1)), "model"))
            leaf = np.asarray(leaf)
            return jax.make_array_from_callback(leaf.shape, sharding, lambda index: leaf[index])

        fsdp = js.hessian_operator(
            mlp_loss, jax.tree_util.tree_map(split, params), mine, batch_size=16, mesh=grid
        )
        w = fsdp.params["layer0"]["w"]
        got["fsdp_param_shards"] = sorted({tuple(s.data.shape) for s in w.addressable_shards})
        got["fsdp_lanczos"] = rel(
            js.lanczos(
                fsdp, key, 30, basis_sharding=NamedSharding(grid, P(None, ("data", "model")))
            ).tridiag,
            single.tridiag,
        )
    except Exception:
        got["fsdp_lanczos"] = traceback.format_exc()
    js.lanczos(four, key, 5, progress=True)  # a bar on stderr: process 0's only
    try:
        skewed = jax.tree_util.tree_map(lambda a: a * (1 + pid), params)
        js.hessian_operator(mlp_loss, skewed, (x[half], y[half]), batch_size=16, mesh=mesh)
        got["different_params"] = "accepted"
    except ValueError as err:
        got["different_params"] = str(err)
    try:  # already global arrays, replicated, with other values on each process
        replicated = NamedSharding(mesh, P())
        skewed = [
            jax.make_array_from_callback(np.shape(a), replicated, lambda i, a=a: np.asarray(a)[i])
            for a in jax.tree_util.tree_leaves(
                jax.tree_util.tree_map(lambda a: a * (1 + pid), params)
            )
        ]
        skewed = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), skewed)
        js.hessian_operator(mlp_loss, skewed, (x[half], y[half]), batch_size=16, mesh=mesh)
        got["different_global_params"] = "accepted"
    except ValueError as err:
        got["different_global_params"] = str(err)
    try:
        fewer = (x[: 30 + pid], y[: 30 + pid])  # 30 samples on process 0, 31 on process 1
        js.hessian_operator(mlp_loss, params, fewer, batch_size=16, mesh=mesh)
        got["different_sizes"] = "accepted"
    except ValueError as err:
        got["different_sizes"] = str(err)
    try:
        js.lanczos(four, jax.random.key(10 + pid), 5)  # a key of its own on each process
        got["different_keys"] = "accepted"
    except ValueError as err:
        got["different_keys"] = str(err)
    devices = np.array(sorted(jax.devices(), key=lambda d: (d.process_index, d.id)))
    across = jax.sharding.Mesh(  # processes along "model", each data position across both
        devices.reshape(2, 2), ("model", "data"), axis_types=(jax.sharding.AxisType.Auto,) * 2
    )
    try:
        js.hessian_operator(mlp_loss, params, (x[half], y[half]), batch_size=16, mesh=across)
        got["processes_across_data"] = "accepted"
    except ValueError as err:
        got["processes_across_data"] = str(err)
    Path(out).write_text(json.dumps(got))


def checkpointed(pid, one, four, mode, folder):
    """Lanczos of order 30 checkpointed every 5 steps: killed at step 15 (``kill``), or
    resumed (``resume``, ``skew``) and compared with one device; ``-sharded``: the basis
    split over the 4 devices, each process saving its own columns."""
    key = jax.random.key(5)
    calls = []
    options = {}
    if mode.endswith("-sharded"):
        mesh = jax.tree_util.tree_leaves(four.stacked)[0].sharding.mesh
        options["basis_sharding"] = NamedSharding(mesh, P(None, "data"))
        mode = mode.removesuffix("-sharded")

    def report(done, total, elapsed):
        calls.append(done)
        if mode == "kill" and done >= 15:  # after the bar, before the save of step 15
            os._exit(3)

    if mode == "skew" and pid == 1:  # as if killed while writing its last state
        mine = Path(folder) / "process-1-of-2"
        os.replace(mine / "state-previous.npz", mine / "state.npz")
    try:
        result = js.lanczos(
            four,
            key,
            30,
            checkpoint=folder,
            checkpoint_every=5,
            resume=mode != "kill",
            progress=report,
            **options,
        )
    except ValueError as err:  # raised on every process, or the others would wait
        return {"error": str(err)}
    shards = sorted({tuple(s.data.shape) for s in result.basis.addressable_shards})
    return {
        "rel": rel(result.tridiag, js.lanczos(one, key, 30).tridiag),
        "reports": calls,
        "basis_shards": shards,
    }


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], *sys.argv[4:])
