"""Spectra across training: records from a user's own optax loop, checked against dense
float64 references, read back, drawn headless; recording leaves training unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import classification_data, init_mlp, mlp_loss
from jax.flatten_util import ravel_pytree

import jax_spectral as js


def _train(x, y, params, steps, folder=None, every=5):
    optimizer = optax.sgd(0.5)
    state = optimizer.init(params)

    @jax.jit
    def update(params, state):
        grads = jax.grad(mlp_loss)(params, (x, y))
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for step in range(steps):
        if folder is not None and step % every == 0:
            H = js.hessian_operator(mlp_loss, params, (x, y), batch_size=16)
            js.training.record(folder, step, H, jax.random.key(step), order=20, top_k=3)
        params, state = update(params, state)
    return params


def test_records_across_an_optax_loop(x64, tmp_path):
    params = init_mlp(jax.random.key(0), [4, 5, 3], jnp.float64)
    x, y = classification_data(jax.random.key(1), 40, 4, 3, jnp.float64)
    x, y = jnp.asarray(x), jnp.asarray(y)
    plain = _train(x, y, params, 12)
    recorded = _train(x, y, params, 12, folder=tmp_path / "spectra")
    leaves = zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(recorded), strict=True)
    for a, b in leaves:
        np.testing.assert_array_equal(a, b)  # recording changed nothing
    records = js.training.load(tmp_path / "spectra")
    assert [r["step"] for r in records] == [0, 5, 10]

    # the step-5 record against the dense float64 Hessian at the step-5 parameters
    at5 = _train(x, y, params, 5)
    flat, unravel = ravel_pytree(at5)
    hessian = np.asarray(jax.hessian(lambda f: mlp_loss(unravel(f), (x, y)))(flat))
    gradient = np.asarray(jax.grad(lambda f: mlp_loss(unravel(f), (x, y)))(flat))
    values, vectors = np.linalg.eigh(hessian)
    record = records[1]
    np.testing.assert_allclose(record["top_eigenvalues"], values[::-1][:3], rtol=1e-8)
    top = vectors[:, ::-1][:, :3]
    share = np.cumsum((top.T @ gradient) ** 2) / np.sum(gradient**2)
    np.testing.assert_allclose(record["gradient_share"], share, atol=1e-8)
    assert record["batch_gradient_share"].shape == (3, 3)  # batches of 16, 16 and 8
    # the dimension is 43 and the order 20: the trace is an SLQ estimate, not exact
    assert abs(record["trace"] - np.trace(hessian)) < 4 * record["trace_stderr"] + 1e-9
    assert record["density"].shape == record["grid"].shape == (1000,)


def test_training_figure_renders_headless(x64, tmp_path):
    pytest.importorskip("matplotlib")
    from jax_spectral.plot import plot_training

    params = init_mlp(jax.random.key(0), [4, 5, 3], jnp.float64)
    x, y = classification_data(jax.random.key(1), 40, 4, 3, jnp.float64)
    _train(jnp.asarray(x), jnp.asarray(y), params, 11, folder=tmp_path / "s")
    fig = plot_training(js.training.load(tmp_path / "s"), path=tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    heat, curves, bar = fig.axes  # the heatmap, the top-k curves, the colour bar
    assert heat.get_ylabel() == "step" and bar.get_ylabel() == "log10 density"
    assert len(curves.get_lines()) == 3


def test_load_refuses_an_empty_or_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        js.training.load(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no step_"):
        js.training.load(tmp_path)


def test_the_trainer_in_pieces_takes_the_same_steps():
    from jax_spectral import datasets

    X, y = datasets.load_digits()
    X, y = X[:100], y[:100]
    model = datasets.mlp((8,))
    params = model.init(jax.random.key(0), X[:1])["params"]
    loss = datasets.cross_entropy_loss(model.apply)
    seen = []
    whole = datasets.train_classifier(loss, params, (X, y), steps=7)
    pieces = datasets.train_classifier(
        loss, params, (X, y), steps=7, every=3, callback=lambda s, p: seen.append(s)
    )
    assert seen == [0, 3, 6, 7]
    pairs = zip(jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(pieces), strict=True)
    for a, b in pairs:
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
