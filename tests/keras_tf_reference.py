"""Reference HVPs from TensorFlow's nested GradientTapes, run in a TensorFlow-backend process.

Usage: python keras_tf_reference.py MODEL.keras DATA.npz OUT.npz
       python keras_tf_reference.py --save MODEL.keras   (build and save a small model)
       python keras_tf_reference.py --bridge-error       (print the bridge's backend error)

DATA.npz holds x, y, batch_size and tangents v_0, v_1, ... (flat, in the order of
model.trainable_variables). OUT.npz gets mean_i and sum_i: the dataset HVPs for each tangent
with the MEAN (sample-weighted) and SUM reductions of the per-batch mean loss.
"""

import os
import sys

os.environ["KERAS_BACKEND"] = "tensorflow"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def loss_fn(model, inputs):
    x, y = inputs
    logits = model(x, training=False)
    losses = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
    return keras.ops.mean(losses)


def main(model_path, data_path, out_path):
    assert keras.backend.backend() == "tensorflow"
    model = keras.saving.load_model(model_path)
    data = np.load(data_path)
    x, y, batch_size = data["x"], data["y"], int(data["batch_size"])
    variables = model.trainable_variables
    shapes = [tuple(v.shape) for v in variables]
    out = {}
    for name in sorted(k for k in data.files if k.startswith("v_")):
        flat = data[name]
        parts, start = [], 0
        for shape in shapes:
            size = int(np.prod(shape))
            parts.append(tf.constant(flat[start : start + size].reshape(shape)))
            start += size
        total_mean = [tf.zeros(s) for s in shapes]
        total_sum = [tf.zeros(s) for s in shapes]
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            with tf.GradientTape() as outer:
                with tf.GradientTape() as inner:
                    value = loss_fn(model, (xb, yb))
                grads = inner.gradient(value, variables)
                directional = tf.add_n(
                    [tf.reduce_sum(g * t) for g, t in zip(grads, parts, strict=True)]
                )
            hv = outer.gradient(directional, variables)
            weight = len(xb) / len(x)
            total_mean = [a + weight * h for a, h in zip(total_mean, hv, strict=True)]
            total_sum = [a + h for a, h in zip(total_sum, hv, strict=True)]
        suffix = name[2:]
        out[f"mean_{suffix}"] = np.concatenate([a.numpy().ravel() for a in total_mean])
        out[f"sum_{suffix}"] = np.concatenate([a.numpy().ravel() for a in total_sum])
    np.savez(out_path, **out)


def save_model(path):
    """Build and save a small model under the TensorFlow backend."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(2)]
    )
    model.save(path)


def bridge_error():
    """Print the bridge's error for a model object built under the TensorFlow backend."""
    from keras_bridge import approximate_hessian

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    try:
        approximate_hessian(model, lambda m, b: keras.ops.sum(m(b[0])), [(np.ones((2, 2)),)], 1)
    except RuntimeError as err:
        print(f"RuntimeError: {err}")


if __name__ == "__main__":
    if sys.argv[1] == "--save":
        save_model(sys.argv[2])
    elif sys.argv[1] == "--bridge-error":
        bridge_error()
    else:
        main(*sys.argv[1:4])
