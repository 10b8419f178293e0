"""keras_bridge.spectrum_callback: the spectrum every N epochs of model.fit, without
changing the training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

pytestmark = pytest.mark.slow  # Keras compiles its training step

keras = pytest.importorskip("keras")

import jax_spectral as js  # noqa: E402
from jax_spectral import datasets  # noqa: E402
from keras_bridge import pure_loss, spectrum_callback, trainable_values  # noqa: E402


def _fit(x, y, callbacks):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(10)]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, epochs=4, batch_size=50, shuffle=False, verbose=0, callbacks=callbacks)
    return model


def loss_fn(model, batch):
    x, y = batch
    logits = model(x, training=False)
    return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))


def test_the_callback_records_and_leaves_training_unchanged(tmp_path):
    X, y = datasets.load_digits()
    x, y = X[:200], y[:200]
    callback = spectrum_callback(
        tmp_path / "spectra", loss_fn, (x, y), every=2, batch_size=100, order=30, top_k=3
    )
    plain, recorded = _fit(x, y, []), _fit(x, y, [callback])
    for a, b in zip(plain.get_weights(), recorded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(plain.optimizer.iterations) == int(recorded.optimizer.iterations) == 16
    records = js.training.load(tmp_path / "spectra")
    assert [r["step"] for r in records] == [0, 2, 4]
    # the last record against the dense Hessian of the same loss at the final weights
    flat, unravel = ravel_pytree(trainable_values(recorded))
    loss = pure_loss(recorded, loss_fn)
    with jax.default_matmul_precision("highest"):
        hessian = np.asarray(jax.hessian(lambda f: loss(unravel(f), (x, y)))(flat), np.float64)
        gradient = np.asarray(jax.grad(lambda f: loss(unravel(f), (x, y)))(flat), np.float64)
    values, vectors = np.linalg.eigh((hessian + hessian.T) / 2)
    np.testing.assert_allclose(records[-1]["top_eigenvalues"], values[::-1][:3], rtol=2e-3)
    top = vectors[:, ::-1][:, :3]
    share = np.cumsum((top.T @ gradient) ** 2) / np.sum(gradient**2)
    np.testing.assert_allclose(records[-1]["gradient_share"], share, atol=5e-3)
    assert jnp.asarray(records[0]["top_eigenvalues"]).shape == (3,)


def test_the_callback_checks_every():
    with pytest.raises(ValueError, match="every"):
        spectrum_callback("x", loss_fn, None, every=0)
