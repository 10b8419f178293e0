"""The Keras bridge against TensorFlow's own gradient tapes and exact identities."""

import os
import warnings

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # TensorFlow's own tapes are the reference

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from keras_bridge import (  # noqa: E402
    approximate_hessian,
    lanczos_algorithm,
    matrix_vector_product,
    pure_loss,
    trainable_values,
)


def test_original_notebook_first_example_verbatim(capsys):
    """The original Keras notebook's first example as written (tf.Tensor data, a loss that
    closes over the global model, tf.keras's mse, [(X, y)]): V T V^T equals 2 X^T X."""
    num_samples = 50
    num_features = 16
    X = tf.random.normal([num_samples, num_features])
    y = tf.random.normal([num_samples])
    linear_model = tf.keras.Sequential(
        [tf.keras.Input(shape=[num_features]), tf.keras.layers.Dense(1, use_bias=False)]
    )

    def loss_fn(model, inputs):
        x, y = inputs
        preds = linear_model(x)
        return tf.keras.losses.mse(y, preds)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        V, T = lanczos_algorithm.approximate_hessian(
            linear_model, loss_fn, [(X, y)], order=num_features
        )
    summed = [w for w in caught if "differentiated as its sum" in str(w.message)]
    assert len(summed) == 1  # warned once, although the closure ran for every step
    assert V.shape == (16, 16) and T.shape == (16, 16) and V.dtype == np.float64
    progress = capsys.readouterr().err
    assert "lanczos" in progress and "16/16" in progress
    H = tf.matmul(V, tf.matmul(T, V, transpose_b=True))  # the notebook's next cell
    x64 = np.asarray(X, np.float64)
    want = 2 * x64.T @ x64
    np.testing.assert_allclose(np.asarray(H), want, rtol=0, atol=1e-6 * np.abs(want).max())
    # The same tensors from any re-iterable, and as integer inputs of the same values.
    with pytest.warns(UserWarning, match="differentiated as its sum"):
        V2, T2 = approximate_hessian(
            linear_model, loss_fn, lambda: iter([(X, y)]), 16, progress=False
        )
    np.testing.assert_allclose(V2 @ T2 @ V2.T, want, rtol=0, atol=1e-6 * np.abs(want).max())
    Xi = tf.constant(np.random.default_rng(0).integers(-3, 4, (50, 16)), tf.int32)
    with pytest.warns(UserWarning, match="differentiated as its sum"):
        V3, T3 = approximate_hessian(linear_model, loss_fn, [(Xi, y)], 16, progress=False)
    want = 2 * np.asarray(Xi, np.float64).T @ np.asarray(Xi, np.float64)
    np.testing.assert_allclose(V3 @ T3 @ V3.T, want, rtol=0, atol=1e-6 * np.abs(want).max())


def test_tf2_lanczos_algorithm_recovers_a_matrix_from_its_products():
    """The original tf2 test: a TensorFlow product of diag(1, 2, 3), order 3, to 1e-7."""
    Q = tf.linalg.diag([1.0, 2.0, 3.0])

    def Qv(v):
        return tf.matmul(Q, v)

    V, T = lanczos_algorithm.lanczos_algorithm(Qv, 3, 3, progress=False)
    Q_lanczos = tf.matmul(tf.matmul(V, T), V, transpose_b=True)
    np.testing.assert_allclose(np.asarray(Q_lanczos), np.diag([1.0, 2.0, 3.0]), atol=1e-7, rtol=0)
    with pytest.warns(RuntimeWarning, match="broke down after 3 of 5 steps"):
        V, T = lanczos_algorithm.lanczos_algorithm(Qv, 3, 5, random_seed=4, progress=False)
    assert V.shape == (3, 5) and np.all(T[3:] == 0)
    with pytest.raises(ValueError, match="mvp_fn returned 2 entries"):
        lanczos_algorithm.lanczos_algorithm(lambda v: v[:2], 3, 2, progress=False)


@pytest.mark.parametrize("reduce_op", ["MEAN", "SUM"])
def test_model_hessian_vector_product_matches_tensorflow_tapes(reduce_op):
    model = _small_classifier()
    rng = np.random.default_rng(3)
    X = rng.standard_normal((13, 3)).astype(np.float32)
    Y = rng.integers(0, 3, 13).astype(np.int32)
    batches = [(X[i : i + 5], Y[i : i + 5]) for i in range(0, 13, 5)]  # last batch of 3

    dataset = tf.data.Dataset.from_tensor_slices((X, Y)).batch(5)
    v = tf.random.uniform((31, 1), minval=-1, maxval=1, seed=2)
    got = matrix_vector_product.model_hessian_vector_product(
        _mean_cross_entropy, model, dataset, v, reduce_op=reduce_op
    )
    want = _tf_dataset_hessian(model.get_weights(), batches, reduce_op) @ np.asarray(v)
    assert got.shape == (31, 1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    with pytest.raises(ValueError, match=r"v must have shape \(31, 1\)"):
        matrix_vector_product.model_hessian_vector_product(
            _mean_cross_entropy, model, dataset, np.ones(5)
        )


def _mean_cross_entropy(model, inputs):
    """The mean sparse cross-entropy of the model's logits (inference mode)."""
    x, y = inputs
    logits = model(x, training=False)
    losses = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
    return keras.ops.mean(losses)


def _small_classifier(features=3, hidden=4, classes=3):
    model = keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(hidden, activation="tanh"),
            keras.layers.Dense(classes),
        ]
    )
    rng = np.random.default_rng(1)
    model.set_weights([0.5 * rng.standard_normal(w.shape) for w in model.get_weights()])
    return model


def _tf_dataset_hessian(weights, batches, reduce_op):
    """Dense Hessian of the dataset loss by TensorFlow nested GradientTapes (float64)."""
    shapes = [w.shape for w in weights]
    flat = tf.Variable(np.concatenate([w.ravel() for w in weights]).astype(np.float64))
    total = sum(len(b[0]) for b in batches)

    def batch_loss(vector, x, y):
        parts, start = [], 0
        for shape in shapes:
            size = int(np.prod(shape))
            parts.append(tf.reshape(vector[start : start + size], shape))
            start += size
        k1, b1, k2, b2 = parts
        logits = tf.tanh(x @ k1 + b1) @ k2 + b2
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
        return tf.reduce_mean(losses)

    hessian = np.zeros((flat.shape[0], flat.shape[0]))
    for x, y in batches:
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                value = batch_loss(flat, tf.constant(x, tf.float64), tf.constant(y))
            grad = inner.gradient(value, flat)
        h = outer.jacobian(grad, flat).numpy()
        hessian += h * (len(x) / total if reduce_op == "MEAN" else 1.0)
    return hessian


@pytest.mark.parametrize("reduce_op", ["MEAN", "SUM"])
def test_full_order_matches_tensorflow_tapes_on_ragged_batches(reduce_op):
    """(V, T) at order = dim on a 189-parameter model against TensorFlow's dense Hessian."""
    model = _small_classifier(features=5, hidden=14, classes=7)
    rng = np.random.default_rng(2)
    X = rng.standard_normal((23, 5)).astype(np.float32)
    Y = rng.integers(0, 7, 23).astype(np.int32)
    batches = [(X[i : i + 5], Y[i : i + 5]) for i in range(0, 23, 5)]  # last batch of 3

    dim = sum(int(np.prod(w.shape)) for w in model.get_weights())
    assert dim == 189
    # Softmax is invariant to shifting all logits: the last layer (14 x 7 kernel, 7 biases)
    # gives 14 + 1 exact zero eigenvalues, one node for Lanczos: 189 - 15 + 1 = 175 steps.
    with pytest.warns(RuntimeWarning, match="broke down after 175 of 189 steps"):
        V, T = approximate_hessian(
            model, _mean_cross_entropy, batches, order=dim, reduce_op=reduce_op
        )
    want = _tf_dataset_hessian(model.get_weights(), batches, reduce_op)
    got = V @ T @ V.T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_tf_data_dataset_gives_the_same_result_as_a_list():
    model = _small_classifier()
    rng = np.random.default_rng(9)
    X = rng.standard_normal((17, 3)).astype(np.float32)
    Y = rng.integers(0, 3, 17).astype(np.int32)

    def loss_fn(model, inputs):
        logits = model(inputs[0], training=False)
        losses = keras.losses.sparse_categorical_crossentropy(inputs[1], logits, from_logits=True)
        return keras.ops.mean(losses)

    dataset = tf.data.Dataset.from_tensor_slices((X, Y)).batch(5)  # 5, 5, 5, 2
    batches = [(X[i : i + 5], Y[i : i + 5]) for i in range(0, 17, 5)]
    V1, T1 = approximate_hessian(model, loss_fn, dataset, order=6, random_seed=3)
    V2, T2 = approximate_hessian(model, loss_fn, batches, order=6, random_seed=3)
    np.testing.assert_allclose(T1, T2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(V1, V2, atol=1e-5)
    # Numpy arrays: one batch of all samples, the same mean.
    V3, T3 = approximate_hessian(model, loss_fn, (X, Y), order=6, random_seed=3)
    np.testing.assert_allclose(T3, T2, rtol=1e-5, atol=1e-6)
    # At full order the tf.data run is the Hessian itself (TensorFlow's tapes, float64).
    with pytest.warns(RuntimeWarning, match="broke down"):  # the Hessian is rank-deficient
        V, T = approximate_hessian(model, loss_fn, dataset, order=31, random_seed=3, progress=False)
    want = _tf_dataset_hessian(model.get_weights(), batches, "MEAN")
    np.testing.assert_allclose(V @ T @ V.T, want, atol=2e-5 * np.abs(want).max())


def test_a_model_saved_under_tensorflow_loads_and_runs_under_jax(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("keras_tf_reference.py")
    path = tmp_path / "tf_model.keras"
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    done = subprocess.run(
        [sys.executable, str(script), "--save", str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    model = keras.saving.load_model(path)
    X = np.random.default_rng(10).standard_normal((9, 4)).astype(np.float32)

    def loss_fn(model, inputs):
        return keras.ops.mean(model(inputs[0], training=False) ** 2)

    V, T = approximate_hessian(model, loss_fn, [(X[:5],), (X[5:],)], order=23, progress=False)
    np.testing.assert_allclose(V.T @ V, np.eye(23), atol=1e-5)
    # The Hessian of the mean squared output over all nine samples, by TensorFlow's tapes
    # in float64 on the weights the file holds: V T V^T is it at full order.
    weights = [np.asarray(w, np.float64) for w in model.get_weights()]
    flat = tf.Variable(np.concatenate([w.ravel() for w in weights]))
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            parts = tf.split(flat, [w.size for w in weights])
            k1, b1, k2, b2 = (tf.reshape(p, w.shape) for p, w in zip(parts, weights, strict=True))
            out = tf.tanh(tf.constant(X, tf.float64) @ k1 + b1) @ k2 + b2
            value = tf.reduce_mean(out**2)
        grad = inner.gradient(value, flat)
    want = outer.jacobian(grad, flat).numpy()
    np.testing.assert_allclose(V @ T @ V.T, want, atol=2e-5 * np.abs(want).max())


def test_keras_state_is_untouched_with_batchnorm_and_dropout_in_training_mode():
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(5),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(2),
        ]
    )
    rng = np.random.default_rng(3)
    X = rng.standard_normal((12, 4)).astype(np.float32)
    Y = rng.integers(0, 2, 12).astype(np.int32)
    before = [np.array(v.value) for v in model.variables]

    def loss_fn(model, inputs):  # batch statistics and dropout on, as a user may ask
        x, y = inputs
        logits = model(x, training=True)
        return keras.ops.mean(
            keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        approximate_hessian(model, loss_fn, [(X[:8], Y[:8]), (X[8:], Y[8:])], order=5)
    after = [np.array(v.value) for v in model.variables]
    assert len(before) == len(after)
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
    for v in model.variables:
        assert not isinstance(v.value, jax.core.Tracer)


def test_pure_loss_is_jittable_and_matches_keras():
    model = _small_classifier()
    x = np.ones((2, 3), np.float32)

    def loss_fn(model, inputs):
        return keras.ops.sum(model(inputs, training=False) ** 2)

    loss = pure_loss(model, loss_fn)
    params = [v.value for v in model.trainable_variables]
    want = float(keras.ops.sum(model(x) ** 2))
    assert float(jax.jit(loss)(params, x)) == pytest.approx(want, rel=1e-6)
    doubled = [2 * p for p in params]
    assert float(jax.jit(loss)(doubled, x)) != pytest.approx(want, rel=1e-3)


def test_cnn_with_batchnorm_and_dropout_against_a_tensorflow_backend_process(tmp_path):
    """Trained with model.fit on digits, saved as .keras, loaded by a TensorFlow-backend
    process that computes HVPs with nested GradientTapes on the same weights."""
    import subprocess
    import sys
    from pathlib import Path

    from jax_spectral import datasets, hessian_operator

    x, y = datasets.load_digits()
    images = x.reshape(-1, 8, 8, 1)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(10),
        ]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(images, y, epochs=1, batch_size=64, verbose=0)
    path = tmp_path / "cnn.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)  # the same file the TensorFlow process reads

    n, batch_size = 100, 32  # batches of 32, 32, 32 and a ragged 4
    xs, ys = images[:n], y[:n]
    rng = np.random.default_rng(0)
    dim = sum(int(np.prod(v.shape)) for v in loaded.trainable_variables)
    tangents = {f"v_{i}": rng.standard_normal(dim).astype(np.float32) for i in range(2)}
    np.savez(tmp_path / "data.npz", x=xs, y=ys, batch_size=batch_size, **tangents)
    script = Path(__file__).with_name("keras_tf_reference.py")
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    argv = [sys.executable, str(script), str(path), str(tmp_path / "data.npz")]
    argv.append(str(tmp_path / "ref.npz"))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = np.load(tmp_path / "ref.npz")

    def loss_fn(model, inputs):
        xb, yb = inputs
        logits = model(xb, training=False)
        losses = keras.losses.sparse_categorical_crossentropy(yb, logits, from_logits=True)
        return keras.ops.mean(losses)

    loss = pure_loss(loaded, loss_fn)
    params = [v.value for v in loaded.trainable_variables]
    batches = [(xs[i : i + batch_size], ys[i : i + batch_size]) for i in range(0, n, batch_size)]
    for reduce in ("mean", "sum"):
        for data in ((xs, ys), batches):
            kwargs = {"batch_size": batch_size} if isinstance(data, tuple) else {}
            op = hessian_operator(loss, params, data, reduce=reduce, **kwargs)
            for i in range(2):
                got = np.asarray(op.matvec(tangents[f"v_{i}"]))
                want = reference[f"{reduce}_{i}"]
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# -- documented errors ------------------------------------------------------------------


def test_unbuilt_model_is_rejected():
    model = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="not built"):
        approximate_hessian(model, lambda m, b: 0.0, [(np.ones((2, 3)),)], order=2)


def test_tensorflow_ops_on_jax_values_are_named():
    model = _small_classifier()

    def loss_fn(model, inputs):
        logits = model(inputs[0], training=False)
        return tf.reduce_mean(logits)  # a TensorFlow op on a JAX array

    with pytest.raises(
        TypeError, match="TensorFlow operation on JAX values \\(line \\d+: return tf"
    ):
        approximate_hessian(model, loss_fn, [(np.ones((2, 3), np.float32),)], order=2)


def test_one_shot_generator_dataset_is_rejected():
    model = _small_classifier()
    batches = ((np.ones((2, 3), np.float32), np.zeros(2, np.int32)) for _ in range(2))
    with pytest.raises(ValueError, match="one-shot iterator"):
        approximate_hessian(model, lambda m, b: keras.ops.sum(m(b[0])), batches, order=2)


def test_order_above_the_number_of_parameters_breaks_down_cleanly():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, use_bias=False)])
    X = np.random.default_rng(4).standard_normal((10, 3)).astype(np.float32)

    def loss_fn(model, inputs):
        return keras.ops.mean(model(inputs[0]) ** 2)

    with pytest.warns(RuntimeWarning, match="broke down after 3 of 6 steps"):
        V, T = approximate_hessian(model, loss_fn, [(X,)], order=6)
    assert np.all(np.isfinite(T)) and np.all(T[3:] == 0) and np.all(V[:, 3:] == 0)
    np.testing.assert_allclose(V @ T @ V.T, 2 * X.T.astype(np.float64) @ X / 10, rtol=1e-4)


def test_a_tensorflow_backend_process_gets_a_clear_error():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("keras_tf_reference.py")
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    done = subprocess.run(
        [sys.executable, str(script), "--bridge-error"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "needs the JAX backend of Keras, but Keras runs on 'tensorflow'" in done.stdout
    assert "KERAS_BACKEND=jax" in done.stdout


def test_bad_reduce_op():
    with pytest.raises(ValueError, match="reduce_op must be 'MEAN' or 'SUM'"):
        approximate_hessian(_small_classifier(), lambda m, b: 0.0, [(np.ones((2, 3)),)], 2, "AVG")


# -- to_flax ----------------------------------------------------------------------------


def _bn_cnn(dropout=0.2):
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            keras.layers.Conv2D(3, 3, padding="same", activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.MaxPooling2D(2),
            keras.layers.Activation("tanh"),
            keras.layers.AveragePooling2D(2, padding="same"),
            keras.layers.Flatten(),
            keras.layers.Dropout(dropout),
            keras.layers.Dense(6, activation="gelu"),
            keras.layers.LayerNormalization(),
            keras.layers.ReLU(),
            keras.layers.Dense(3),
        ]
    )
    rng = np.random.default_rng(5)
    # Non-trivial moving statistics, so inference and batch statistics differ.
    model.set_weights([w + 0.3 * rng.standard_normal(w.shape) for w in model.get_weights()])
    bn = model.layers[1]
    bn.moving_variance.assign(np.abs(np.asarray(bn.moving_variance.value)) + 0.5)
    return model


def _functional():
    inputs = keras.Input((5,))
    a = keras.layers.Dense(4, activation="relu")(inputs)
    b = keras.layers.Dense(4)(inputs)
    merged = keras.layers.Concatenate()([keras.layers.Add()([a, b]), b])
    return keras.Model(inputs, keras.layers.Dense(2)(merged))


@pytest.mark.parametrize("mode", ["module", "stateless"])
def test_to_flax_outputs_equal_keras(mode):
    from keras_bridge import to_flax

    x = np.random.default_rng(6).standard_normal((4, 8, 8, 2)).astype(np.float32)
    model = _bn_cnn()
    apply_fn, variables = to_flax(model, mode=mode)
    want = np.asarray(model(x, training=False))
    np.testing.assert_allclose(apply_fn(variables, x), want, rtol=1e-5, atol=1e-5)
    if mode == "module":
        assert set(variables) == {"params", "batch_stats"}
        assert set(variables["params"][model.layers[-1].name]) == {"kernel", "bias"}
        assert set(variables["batch_stats"][model.layers[1].name]) == {"mean", "var"}
    # Batch statistics (train=True), compared with Keras where Dropout is the identity.
    plain = _bn_cnn(dropout=0.0)
    apply_plain, variables_plain = to_flax(plain, mode=mode)
    got_train = apply_plain(variables_plain, x, train=True)
    want_train = np.asarray(plain(x, training=True))
    np.testing.assert_allclose(got_train, want_train, rtol=1e-5, atol=1e-5)
    assert not np.allclose(want_train, np.asarray(plain(x, training=False)), atol=1e-3)
    before = [np.array(v.value) for v in plain.variables]
    jax.jit(apply_plain, static_argnames="train")(variables_plain, x, train=True)
    for b, v in zip(before, plain.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(v.value), b)


@pytest.mark.parametrize("mode", ["module", "stateless"])
def test_functional_models(mode):
    from keras_bridge import to_flax

    model = _functional()
    x = np.random.default_rng(7).standard_normal((3, 5)).astype(np.float32)
    apply_fn, variables = to_flax(model, mode=mode)
    np.testing.assert_allclose(apply_fn(variables, x), np.asarray(model(x)), rtol=1e-5, atol=1e-6)
    if mode == "module":
        assert len(variables["params"]) == 3  # three Dense layers; Add/Concatenate have none


def test_shared_layer_in_a_functional_model():
    from keras_bridge import to_flax

    inputs = keras.Input((3,))
    shared = keras.layers.Dense(3, activation="tanh")
    outputs = keras.layers.Dense(1)(shared(shared(inputs)))
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(11).standard_normal((4, 3)).astype(np.float32)
    apply_fn, variables = to_flax(model, mode="module")
    assert len(variables["params"]) == 2
    np.testing.assert_allclose(apply_fn(variables, x), np.asarray(model(x)), rtol=1e-5, atol=1e-6)


def test_to_flax_hvp_equals_the_stateless_scope_hvp():
    from jax_spectral import hessian_operator
    from keras_bridge import to_flax

    model = _bn_cnn()
    rng = np.random.default_rng(8)
    x = rng.standard_normal((10, 8, 8, 2)).astype(np.float32)
    y = rng.integers(0, 3, 10).astype(np.int32)

    def loss_fn(model, inputs):
        logits = model(inputs[0], training=False)
        return keras.ops.mean(
            keras.losses.sparse_categorical_crossentropy(inputs[1], logits, from_logits=True)
        )

    apply_fn, variables = to_flax(model, mode="module")

    def flax_loss(params, batch):
        logits = apply_fn({**variables, "params": params}, batch[0])
        return keras.ops.mean(
            keras.losses.sparse_categorical_crossentropy(batch[1], logits, from_logits=True)
        )

    op_keras = hessian_operator(pure_loss(model, loss_fn), trainable_values(model), (x, y))
    op_flax = hessian_operator(flax_loss, variables["params"], (x, y))
    assert op_keras.dim == op_flax.dim
    v_tree = jax.tree_util.tree_map(
        lambda a: jax.random.normal(jax.random.key(a.size), a.shape), variables["params"]
    )
    got = op_flax.matvec_tree(v_tree)
    # The same tangent in Keras's variable order.
    order = [(v.path.split("/")[-2], v.name) for v in model.trainable_variables]
    names = {"gamma": "scale", "beta": "bias"}
    v_list = [v_tree[layer][names.get(name, name)] for layer, name in order]
    want = op_keras.unravel(op_keras.matvec(op_keras.ravel(v_list)))
    for (layer, name), w in zip(order, want, strict=True):
        np.testing.assert_allclose(
            got[layer][names.get(name, name)], w, rtol=1e-4, atol=1e-5 * np.abs(w).max()
        )


def test_unsupported_layer_is_named():
    from keras_bridge import to_flax

    model = keras.Sequential([keras.Input((4, 3)), keras.layers.LSTM(2), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="cannot translate layer 'lstm.*' of type LSTM"):
        to_flax(model, mode="module")
    apply_fn, variables = to_flax(model)  # auto: stateless_call
    x = np.ones((2, 4, 3), np.float32)
    np.testing.assert_allclose(apply_fn(variables, x), np.asarray(model(x)), rtol=1e-5)


def test_to_flax_refuses_what_it_would_mistranslate_and_auto_falls_back():
    from keras_bridge import to_flax

    x = np.random.default_rng(12).standard_normal((3, 4)).astype(np.float32)
    frozen = keras.layers.Dense(3)
    cases = {
        "applies the operation": lambda i: keras.layers.Dense(2)(i * 2.0),
        "activation 'gelu'": lambda i: keras.layers.Dense(2, activation=jax.nn.gelu)(i),
        "call arguments": lambda i: keras.layers.Dropout(0.9)(
            keras.layers.Dense(2)(i), training=True
        ),
        "frozen": lambda i: keras.layers.Dense(2)(frozen(i)),
        "mixed-precision": lambda i: keras.layers.Dense(2, dtype="mixed_bfloat16")(i),
    }
    for message, build in cases.items():
        inputs = keras.Input((4,))
        model = keras.Model(inputs, build(inputs))
        frozen.trainable = False
        with pytest.raises(ValueError, match=message):
            to_flax(model, mode="module")
        if message == "call arguments":
            continue  # Dropout forced on: random, nothing to compare
        apply_fn, variables = to_flax(model)  # auto: through Keras itself
        np.testing.assert_allclose(
            np.asarray(apply_fn(variables, x), np.float32),
            np.asarray(model(x), np.float32),
            rtol=1e-5,
            atol=1e-6,
        )
    embed = keras.Sequential([keras.Input((2,)), keras.layers.Embedding(5, 3, mask_zero=True)])
    with pytest.raises(ValueError, match="mask_zero"):
        to_flax(embed, mode="module")


def test_stateless_handles_subclassed_models_with_repeated_names():
    from keras_bridge import to_flax

    class Twice(keras.Model):
        def __init__(self):
            super().__init__()
            self.first = keras.layers.Dense(3, name="d")
            self.second = keras.layers.Dense(2, name="d")

        def call(self, x):  # no `training` argument
            return self.second(jax.nn.tanh(self.first(x)))

    model = Twice()
    x = np.random.default_rng(13).standard_normal((4, 5)).astype(np.float32)
    model(x)
    apply_fn, variables = to_flax(model)
    np.testing.assert_allclose(apply_fn(variables, x), np.asarray(model(x)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        apply_fn(variables, x, train=True), np.asarray(model(x)), rtol=1e-5, atol=1e-6
    )


def test_normalisation_keeps_precision_for_inputs_with_a_large_mean():
    from keras_bridge import to_flax

    model = keras.Sequential([keras.Input((6,)), keras.layers.LayerNormalization()])
    x = 100.0 + np.random.default_rng(14).standard_normal((3, 6)).astype(np.float32)
    apply_fn, variables = to_flax(model, mode="module")
    np.testing.assert_allclose(apply_fn(variables, x), np.asarray(model(x)), atol=5e-5)


def test_activity_regularizer_losses_reach_the_closure():
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, activity_regularizer=keras.regularizers.L2(1.0))]
    )
    x = np.random.default_rng(15).standard_normal((4, 3)).astype(np.float32)

    def loss_fn(model, inputs):
        out = model(inputs, training=False)
        return keras.ops.mean(out**2) + keras.ops.sum(model.losses)

    eager = float(loss_fn(model, x))
    loss = pure_loss(model, loss_fn)
    assert float(jax.jit(loss)(trainable_values(model), x)) == pytest.approx(eager, rel=1e-6)


def test_model_without_trainable_weights_is_named_as_such():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.trainable = False
    with pytest.raises(ValueError, match="no trainable weights"):
        pure_loss(model, lambda m, b: keras.ops.sum(m(b)))


def test_pure_model_gives_the_ggn_and_fisher_of_a_keras_model(x64):
    """ggn_operator / fisher_operator on pure_model and loading.output_loss against the same
    network written in jnp (dense J^T H_L J and per-sample gradients, float64)."""
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    import jax_spectral as js
    from keras_bridge import layer_blocks, loading, pure_model, trainable_values

    model = _small_classifier()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((11, 3))
    y = rng.integers(0, 3, 11)
    params = [jnp.asarray(w, jnp.float64) for w in trainable_values(model)]
    model_fn = pure_model(model)
    np.testing.assert_allclose(model_fn(params, x), np.asarray(model(x)), rtol=1e-6)
    out_loss = loading.output_loss(model, "sparse_categorical_crossentropy", from_logits=True)
    flat, unravel = ravel_pytree(params)

    def logits(f, inputs):
        w1, b1, w2, b2 = unravel(f)
        return jnp.tanh(inputs @ w1 + b1) @ w2 + b2

    def loss_on(o, labels):
        return -jnp.mean(jax.nn.log_softmax(o)[jnp.arange(len(labels)), labels])

    out = logits(flat, x)
    jac = jax.jacfwd(logits)(flat, x).reshape(out.size, -1)
    ggn = jac.T @ jax.hessian(loss_on)(out, y).reshape(out.size, out.size) @ jac
    grads = jax.vmap(
        jax.grad(lambda f, xi, yi: loss_on(logits(f, xi[None]), yi[None])), (None, 0, 0)
    )(flat, x, y)
    eye = jnp.eye(flat.size)
    G = js.ggn_operator(model_fn, out_loss, params, (x, y), batch_size=4)
    np.testing.assert_allclose(jax.vmap(G.matvec)(eye), ggn, atol=1e-6)
    F = js.fisher_operator(model_fn, out_loss, params, (x, y), batch_size=4)
    np.testing.assert_allclose(jax.vmap(F.matvec)(eye), grads.T @ grads / 11, atol=1e-6)
    blocks = layer_blocks(model)
    assert len(blocks) == 2
    last = js.ggn_operator(model_fn, out_loss, params, (x, y), wrt=list(blocks.values())[1])
    n0 = params[0].size + params[1].size
    np.testing.assert_allclose(jax.vmap(last.matvec)(jnp.eye(last.dim)), ggn[n0:, n0:], atol=1e-6)
