"""Keras bridge speed: approximate_hessian against the core operator and against TensorFlow.

Run by hand:  python benchmarks/bench_keras.py [--order 20]

The original package's CIFAR-10 CNN (3,548,234 parameters) on 256 synthetic 32x32x3 images
in batches of 128, one fixed set of weights, three Lanczos runs of ``order`` steps with the
same recurrence (full reorthogonalisation):

1. the core engine on the same model translated by ``keras_bridge.to_flax`` (a flax module,
   no Keras in the loop): ``hessian_operator`` + ``lanczos``;
2. ``keras_bridge.approximate_hessian`` (the user's Keras closure through StatelessScope);
3. TensorFlow: the same ``.keras`` file loaded in a TensorFlow-backend subprocess, HVPs by
   nested ``GradientTape`` inside one ``tf.function``, the recurrence in NumPy float64 as in
   the original package (its ``tf2/lanczos_algorithm.py``).

It prints seconds per step for each and the ratios bridge / core and bridge / TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TF_SCRIPT = r"""
import os, sys, json, time
os.environ["KERAS_BACKEND"] = "tensorflow"
import numpy as np, keras, tensorflow as tf

model = keras.saving.load_model(sys.argv[1])
data = np.load(sys.argv[2])
x, y, order, batch = data["x"], data["y"], int(data["order"]), 128
variables = model.trainable_variables
shapes = [tuple(v.shape) for v in variables]
sizes = [int(np.prod(s)) for s in shapes]

@tf.function(reduce_retracing=True)
def batch_hvp(xb, yb, flat):
    parts = tf.split(flat, sizes)
    tangents = [tf.reshape(p, s) for p, s in zip(parts, shapes)]
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            logits = model(xb, training=False)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=yb, logits=logits))
        grads = inner.gradient(loss, variables)
        dot = tf.add_n([tf.reduce_sum(g * t) for g, t in zip(grads, tangents)])
    hv = outer.gradient(dot, variables)
    return tf.concat([tf.reshape(h, [-1]) for h in hv], 0)

def hvp(v):
    total = np.zeros_like(v)
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        total += len(xb) / len(x) * batch_hvp(xb, yb, tf.constant(v, tf.float32)).numpy()
    return total.astype(np.float64)

dim = sum(sizes)
hvp(np.ones(dim, np.float32))  # trace and warm up
v = np.random.default_rng(0).uniform(-1, 1, dim); v /= np.linalg.norm(v)
basis = np.zeros((order, dim)); basis[0] = v
alphas, betas = np.zeros(order), np.zeros(order)
start = time.perf_counter()
for i in range(order):
    w = hvp(basis[i].astype(np.float32))
    alphas[i] = w @ basis[i]
    w -= alphas[i] * basis[i] + (betas[i - 1] * basis[i - 1] if i else 0)
    for _ in range(2):
        w -= basis.T @ (basis @ w)
    betas[i] = np.linalg.norm(w)
    if i + 1 < order:
        basis[i + 1] = w / betas[i]
elapsed = time.perf_counter() - start
print(json.dumps({"seconds_per_step": elapsed / order, "tf": tf.__version__}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--order", type=int, default=20)
    args = parser.parse_args()
    os.environ["KERAS_BACKEND"] = "jax"

    import jax
    import keras
    import numpy as np
    import optax

    from jax_spectral import hessian_operator, lanczos
    from keras_bridge import approximate_hessian, to_flax

    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            layers.Conv2D(64, 3, activation="relu"),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(128, 3, activation="relu"),
            layers.Conv2D(128, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(1024, activation="relu"),
            layers.Dense(10),
        ]
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, 256).astype(np.int32)
    batches = [(x[i : i + 128], y[i : i + 128]) for i in range(0, 256, 128)]
    num_params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)

    print("# jax-spectral Keras bridge benchmark")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; python "
        f"{platform.python_version()}; jax {jax.__version__}; keras {keras.__version__}"
    )
    print(
        f"model: CIFAR CNN, {num_params:,} parameters; 256 images in batches of 128; "
        f"order {args.order}"
    )

    def keras_loss(model, inputs):
        xb, yb = inputs
        logits = model(xb, training=False)
        losses = keras.losses.sparse_categorical_crossentropy(yb, logits, from_logits=True)
        return keras.ops.mean(losses)

    apply_fn, variables = to_flax(model, mode="module")

    def flax_loss(params, batch):
        logits = apply_fn({"params": params}, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    core_op = hessian_operator(flax_loss, variables["params"], batches)
    v0 = jax.random.uniform(jax.random.key(0), (core_op.dim,), minval=-1.0, maxval=1.0)
    lanczos(core_op, None, 2, v0=v0)  # compile
    start = time.perf_counter()
    lanczos(core_op, None, args.order, v0=v0).tridiag.block_until_ready()
    core = (time.perf_counter() - start) / args.order

    approximate_hessian(model, keras_loss, batches, order=2)  # compile
    start = time.perf_counter()
    approximate_hessian(model, keras_loss, batches, order=args.order)
    bridge = (time.perf_counter() - start) / args.order

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cnn.keras"
        model.save(path)
        np.savez(Path(tmp) / "data.npz", x=x, y=y, order=args.order)
        env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
        done = subprocess.run(
            [sys.executable, "-c", TF_SCRIPT, str(path), str(Path(tmp) / "data.npz")],
            capture_output=True,
            text=True,
            env=env,
        )
        if done.returncode != 0:
            print(done.stderr[-3000:])
            raise SystemExit("the TensorFlow run failed")
        tf_result = json.loads(done.stdout.strip().splitlines()[-1])
    tf_step = tf_result["seconds_per_step"]

    print(f"(tensorflow {tf_result['tf']})")
    print(f"{'run':<44}{'s / step':>10}")
    print(f"{'core engine, to_flax module':<44}{core:>10.3f}")
    print(f"{'keras_bridge.approximate_hessian':<44}{bridge:>10.3f}")
    print(f"{'TensorFlow nested tapes (original recurrence)':<44}{tf_step:>10.3f}")
    print(f"{'bridge / core':<44}{bridge / core:>10.3f}")
    print(f"{'bridge / TensorFlow':<44}{bridge / tf_step:>10.3f}")


if __name__ == "__main__":
    main()
