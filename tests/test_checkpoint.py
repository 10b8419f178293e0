"""Checkpoint and resume: a run killed with SIGKILL and resumed gives the uninterrupted
tridiagonal bit for bit; corrupt and mismatched checkpoints are refused."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from checkpoint_worker import ORDER, problem, run
from conftest import classification_data, mlp_loss

from jax_spectral import checkpoint as ckpt_module
from jax_spectral import hessian_operator, lanczos, slq

WORKER = Path(__file__).with_name("checkpoint_worker.py")


def _state_meta(folder):
    with np.load(folder / "state.npz") as saved:
        return json.loads(str(saved["meta"]))


@pytest.mark.parametrize(
    "kind, loop", [("lanczos", "scan"), ("lanczos", "host"), ("slq", "scan"), ("slq", "host")]
)
@pytest.mark.slow
def test_killed_run_resumes_to_the_identical_tridiagonal(kind, loop, tmp_path):
    folder = tmp_path / "ckpt"
    killed = subprocess.run(
        [sys.executable, str(WORKER), str(folder), kind, loop, "13"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr  # SIGKILL, mid-run
    meta = _state_meta(folder)
    # The checkpoint after step 10 may still have been in flight (written in the background):
    # at most one interval more is lost, and what is on disk is complete.
    assert meta["next_step"] in (5, 10) and not meta["done"]
    seen = []
    resumed = run(folder, kind, loop, progress=lambda *s: seen.append(s[0]), resume=True)
    assert seen[0] >= meta["next_step"] and seen[-1] == ORDER  # the bar starts where it stopped
    uninterrupted = run(tmp_path / "fresh", kind, loop)
    np.testing.assert_array_equal(np.asarray(resumed), np.asarray(uninterrupted))
    # ... and a checkpointed run is the plain run.
    op = problem(loop)
    if kind == "lanczos":
        plain = lanczos(op, jax.random.key(2), ORDER).tridiag
    else:
        plain = slq(op, jax.random.key(2), num_probes=3, order=ORDER).lanczos.tridiag
    np.testing.assert_allclose(np.asarray(resumed), np.asarray(plain), rtol=1e-6, atol=1e-7)
    assert _state_meta(folder)["done"]


def test_corrupt_and_mismatched_checkpoints_are_refused(tmp_path):
    folder = tmp_path / "ckpt"
    run(folder, "lanczos", "scan")
    reference = run(folder, "lanczos", "scan", resume=True)  # done: read back, nothing run

    op = problem("scan")
    with pytest.raises(ValueError, match=r"different settings \(order: now 12, saved 24\)"):
        lanczos(op, jax.random.key(2), 12, checkpoint=folder, resume=True)
    with pytest.raises(ValueError, match="different operator, data or start vectors.*start"):
        lanczos(op, jax.random.key(7), ORDER, checkpoint=folder, resume=True)
    other = jax.tree_util.tree_map(lambda a: a * 1.001, op.params)
    x, y = classification_data(jax.random.key(1), 45, 6, 4)
    moved = hessian_operator(mlp_loss, other, (x, y), batch_size=10, loop="scan")
    with pytest.raises(ValueError, match="operator and data"):
        lanczos(moved, jax.random.key(2), ORDER, checkpoint=folder, resume=True)
    with pytest.raises(FileExistsError, match="pass resume=True"):
        lanczos(op, jax.random.key(2), ORDER, checkpoint=folder)

    segment = sorted(folder.glob("basis-*.npy"))[1]
    segment.write_bytes(segment.read_bytes()[:-8])
    with pytest.raises(ValueError, match=f"corrupt: {segment.name}"):
        run(folder, "lanczos", "scan", resume=True)
    (folder / "state.npz").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="unreadable or corrupt"):
        run(folder, "lanczos", "scan", resume=True)
    assert reference.shape == (ORDER, ORDER)


def test_a_write_interrupted_mid_checkpoint_leaves_the_previous_one(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    calls = {"n": 0}
    real_replace = ckpt_module.os.replace

    def failing_replace(src, dst):
        calls["n"] += 1
        if Path(dst).name == "state.npz" and calls["n"] > 4:  # the third state write
            raise KeyboardInterrupt("killed while renaming")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_module.os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        run(folder, "lanczos", "host")
    monkeypatch.setattr(ckpt_module.os, "replace", real_replace)
    assert _state_meta(folder)["next_step"] == 10  # the last complete checkpoint
    resumed = run(folder, "lanczos", "host", resume=True)
    fresh = run(tmp_path / "fresh", "lanczos", "host")
    np.testing.assert_array_equal(np.asarray(resumed), np.asarray(fresh))


def test_bad_checkpoint_settings(tmp_path):
    op = problem("scan")
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="checkpoint_every must be a positive int"):
            lanczos(op, jax.random.key(2), 4, checkpoint=tmp_path / str(bad), checkpoint_every=bad)
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,))
    sharding = NamedSharding(mesh, P(None, "data"))
    with pytest.raises(ValueError, match="basis_sharding= applies to the scanned loop"):
        lanczos(problem("host"), jax.random.key(2), 4, basis_sharding=sharding)
    one = lanczos(op, jax.random.key(2), 6, basis_sharding=sharding)  # one device: no-op
    np.testing.assert_array_equal(one.tridiag, lanczos(op, jax.random.key(2), 6).tridiag)


def test_a_different_loss_is_refused_even_when_its_code_is_the_same(tmp_path):
    """Closures, captured arrays and partial arguments change the products: a loss scaled
    by 100 resumed the old run's spectrum before. An equal loss under another name resumes."""
    import functools

    import jax.numpy as jnp

    x, y = classification_data(jax.random.key(1), 45, 6, 4)
    op = problem("scan")

    def scaled(params, batch, factor):
        return factor * mlp_loss(params, batch)

    def make(loss):
        return hessian_operator(loss, op.params, (x, y), batch_size=10, loop="scan")

    folder = tmp_path / "ckpt"
    lanczos(
        make(functools.partial(scaled, factor=1.0)), jax.random.key(2), ORDER, checkpoint=folder
    )
    factor = jnp.asarray(100.0)
    for other in (functools.partial(scaled, factor=100.0), lambda p, b: factor * mlp_loss(p, b)):
        with pytest.raises(ValueError, match="operator and data"):
            lanczos(make(other), jax.random.key(2), ORDER, checkpoint=folder, resume=True)

    def renamed(params, batch):
        return 1.0 * mlp_loss(params, batch)

    resumed = lanczos(make(renamed), jax.random.key(2), ORDER, checkpoint=folder, resume=True)
    assert int(resumed.num_steps) == ORDER


def test_a_loss_capturing_a_typed_key_checkpoints_and_resumes(tmp_path):
    import jax.numpy as jnp

    x, y = classification_data(jax.random.key(1), 45, 6, 4)
    op = problem("scan")
    key = jax.random.key(5)

    def noisy(params, batch):  # a fixed key captured by the loss, e.g. for a dropout mask
        return mlp_loss(params, batch) + 0.0 * jnp.sum(jax.random.normal(key, (2,)))

    made = hessian_operator(noisy, op.params, (x, y), batch_size=10, loop="scan")
    first = lanczos(made, jax.random.key(2), ORDER, checkpoint=tmp_path / "c")
    again = lanczos(made, jax.random.key(2), ORDER, checkpoint=tmp_path / "c", resume=True)
    np.testing.assert_array_equal(np.asarray(first.tridiag), np.asarray(again.tridiag))


def test_a_stream_checkpoint_covers_every_batch(tmp_path):
    """The fingerprint of a stream covered its first batch and sample count only: a stream
    whose later batches had changed resumed the old run's spectrum."""
    x, y = (np.asarray(a) for a in classification_data(jax.random.key(1), 60, 6, 4))
    op = problem("host")

    def stream(x, y, order=None):
        batches = [(x[i : i + 15], y[i : i + 15]) for i in range(0, 60, 15)]
        if order is not None:
            batches = [batches[i] for i in order]
        return hessian_operator(mlp_loss, op.params, lambda: iter(batches))

    folder = tmp_path / "ckpt"
    lanczos(stream(x, y), jax.random.key(2), ORDER, checkpoint=folder)
    later = x.copy()
    later[30:] *= 10.0  # the first batch and the count are unchanged
    with pytest.raises(ValueError, match="operator and data"):
        lanczos(stream(later, y), jax.random.key(2), ORDER, checkpoint=folder, resume=True)
    # The same batches in another order are the same operator, and resume.
    resumed = lanczos(
        stream(x, y, [3, 1, 0, 2]), jax.random.key(2), ORDER, checkpoint=folder, resume=True
    )
    assert int(resumed.num_steps) == ORDER


@pytest.mark.slow
def test_a_second_run_on_a_busy_folder_is_refused(tmp_path):
    """Two processes on one folder wrote the same temporary names (one died with a raw
    FileNotFoundError in 8 of 13 tries); the second is now refused at once, naming the
    first, and the first runs to its end."""
    from interrupt_worker import run as long_run

    folder = tmp_path / "ckpt"
    worker = Path(__file__).with_name("interrupt_worker.py")
    first = subprocess.Popen(
        [sys.executable, str(worker), "lanczos", "scan", str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in first.stdout:
            if line.startswith("step "):  # running, and holding the folder
                break
        with pytest.raises(RuntimeError, match=f"in use by process {first.pid}"):
            long_run("lanczos", "scan", folder, resume=True)
    finally:
        first.send_signal(2)  # SIGINT: it saves and exits 130
        _, err = first.communicate(timeout=300)  # (it prints its result: keep reading)
    assert first.returncode == 130, err
    resumed = long_run("lanczos", "scan", folder, resume=True)  # the lock was released
    assert int(resumed.num_steps) > 0


def test_a_hand_edited_checkpoint_cannot_reach_outside_its_folder(tmp_path):
    folder = tmp_path / "ckpt"
    run(folder, "lanczos", "scan")
    state = folder / "state.npz"
    with np.load(state) as saved:
        meta = json.loads(str(saved["meta"]))
        small = {k: saved[k] for k in saved.files if k != "meta"}
    first = meta["segments"][0]
    outside = tmp_path / first["file"]
    outside.write_bytes((folder / first["file"]).read_bytes())

    def edited(**change):
        segment = dict(first, **change)
        np.savez(state, meta=np.array(json.dumps(dict(meta, segments=[segment]))), **small)

    edited(file="../" + first["file"])
    with pytest.raises(ValueError, match="expected basis-SSSSSS-EEEEEE.npy in the folder"):
        run(folder, "lanczos", "scan", resume=True)
    edited(stop=first["stop"] + 100)
    with pytest.raises(ValueError, match="rows within 0..24"):
        run(folder, "lanczos", "scan", resume=True)
    short = np.load(folder / first["file"])[:-1]  # one row short, with a matching hash
    name = f"basis-{first['start']:06d}-{first['stop']:06d}.npy"
    np.save(folder / name, short)
    import hashlib

    edited(sha256=hashlib.sha256((folder / name).read_bytes()).hexdigest())
    with pytest.raises(ValueError, match=r"holds float32 \("):
        run(folder, "lanczos", "scan", resume=True)
