"""Small real data that ships offline, and the demo model.

The default data is scikit-learn's bundled copy of the UCI handwritten digits (1,797
8x8 images, 10 classes), read from the scikit-learn installation: nothing is downloaded.
Install it with ``pip install 'jax-spectral[demo]'``.
"""

from __future__ import annotations

import functools
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "cross_entropy_loss",
    "load_arrays",
    "load_digits",
    "mlp",
    "prepare_tfds_digits",
    "train_classifier",
]


def load_digits(dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """The digits data: ``X`` of shape (1797, 64) scaled to [0, 1] and int32 labels ``y``."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as err:
        raise ImportError(
            "the digits data comes from scikit-learn's bundled copy; install it with "
            "pip install 'jax-spectral[demo]'"
        ) from err
    bunch = _load()
    return (bunch.data / 16.0).astype(dtype), bunch.target.astype(np.int32)


def load_arrays(
    spec: str,
    *,
    data_dir: str | None = None,
    split: str = "train",
    keys: tuple[str, str] | None = None,
    limit: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets ``(x, y)`` from one of three sources, never downloading:

    * ``"digits"``: :func:`load_digits`;
    * a path to a ``.npz`` file holding arrays ``x`` and ``y`` (or the names in ``keys``);
    * ``"tfds:NAME"``: the split ``split`` of a tensorflow-datasets dataset already prepared
      under ``data_dir`` (``tfds.load(..., download=False)``); its supervised pair, or the
      features named in ``keys`` (default ``("image", "label")``).

    ``limit`` keeps the first ``limit`` samples. Raises ``FileNotFoundError`` or
    ``ValueError`` with a one-line message for a missing file, missing arrays, mismatched
    lengths or a dataset that is not prepared, and ``ImportError`` when tensorflow-datasets
    is needed but missing.
    """
    if spec == "digits":
        x, y = load_digits()
    elif spec.startswith("tfds:"):
        x, y = _load_tfds(spec[5:], data_dir, split, keys, limit)
    else:
        x, y = _load_npz(spec, keys or ("x", "y"))
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError(f"{spec}: inputs and targets need a leading sample axis.")
    if len(x) != len(y):
        raise ValueError(f"{spec}: {len(x)} inputs but {len(y)} targets.")
    for what, values in (("inputs", x), ("targets", y)):
        if not np.issubdtype(values.dtype, np.number):
            raise ValueError(f"{spec}: the {what} have dtype {values.dtype}; expected numbers.")
        if np.issubdtype(values.dtype, np.inexact) and not np.all(np.isfinite(values)):
            raise ValueError(f"{spec}: the {what} contain NaN or Inf.")
    if limit is not None:
        x, y = x[:limit], y[:limit]
    if len(x) == 0:
        raise ValueError(f"{spec}: the data holds no samples.")
    return x, y


def prepare_tfds_digits(data_dir: str, name: str = "digits_local") -> str:
    """Write the bundled digits as a tensorflow-datasets dataset under ``data_dir``.

    Splits ``train`` (the first 1,500 samples) and ``test`` (the other 297); features
    ``image`` (8x8x1 uint8, the raw 0..16 pixel values) and ``label`` (10 classes); tfds
    stores each split's examples in its own shuffled order. Then
    ``load_arrays(f"tfds:{name}", data_dir=data_dir)`` (or ``tfds.load(name,
    data_dir=data_dir, download=False)``) reads it back; nothing is downloaded. Returns the
    name. A dataset already prepared there (complete) is left as it is.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    if (Path(data_dir) / name / "1.0.0" / "dataset_info.json").is_file():
        return name  # prepared (tfds writes elsewhere and renames when complete)
    x, y = load_digits()
    images = np.rint(x * 16).astype(np.uint8).reshape(-1, 8, 8, 1)
    features = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(8, 8, 1)),
            "label": tfds.features.ClassLabel(num_classes=10),
        }
    )
    splits = {
        "train": tf.data.Dataset.from_tensor_slices({"image": images[:1500], "label": y[:1500]}),
        "test": tf.data.Dataset.from_tensor_slices({"image": images[1500:], "label": y[1500:]}),
    }
    tfds.disable_progress_bar()
    try:
        tfds.dataset_builders.store_as_tfds_dataset(
            name=name,
            version="1.0.0",
            features=features,
            split_datasets=splits,
            data_dir=str(data_dir),
        )
    finally:
        tfds.enable_progress_bar()
    return name


def _load_npz(path: str, keys: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"no data file {path!r} (expected 'digits', 'tfds:NAME' or an .npz file)."
        )
    if not zipfile.is_zipfile(file):
        raise ValueError(
            f"{path}: not an .npz file (one is a zip archive written by "
            "numpy.savez, with arrays x and y)."
        )
    try:
        with np.load(file, allow_pickle=False) as arrays:
            found = list(arrays.keys())
            missing = [k for k in keys if k not in found]
            if missing:
                raise ValueError(
                    f"{path}: no array named {missing[0]!r}; it holds {', '.join(found) or 'none'}"
                    f" (name the inputs and targets with --keys X,Y)."
                )
            return arrays[keys[0]], arrays[keys[1]]
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npz file ({err}).") from None
    except ValueError as err:
        if str(err).startswith(path):
            raise
        raise ValueError(f"{path}: not a readable .npz file ({err}).") from None


def _load_tfds(name, data_dir, split, keys, limit):
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(
            "tfds: data needs tensorflow-datasets: pip install 'jax-spectral[tfds]'"
        ) from err
    try:
        dataset, info = tfds.load(
            name,
            split=split,
            data_dir=data_dir,
            download=False,
            with_info=True,
            shuffle_files=False,
        )
    except ModuleNotFoundError as err:  # tfds imports parts of its dependencies lazily
        raise ImportError(
            f"tensorflow-datasets needs {err.name}: pip install 'jax-spectral[tfds]'"
        ) from err
    except Exception as err:  # tfds raises many types; the message is what matters
        text = str(err).strip()
        first = text.splitlines()[0].rstrip(".") if text else type(err).__name__
        where = data_dir or "the default data_dir"
        raise ValueError(
            f"tensorflow-datasets could not read {name!r} (split {split!r}) from {where}: "
            f"{first}. jax-spectral never downloads: prepare the dataset there first."
        ) from None
    supervised = info.supervised_keys
    if keys is None:
        keys = tuple(supervised) if supervised and len(supervised) == 2 else ("image", "label")
    xs, ys, count = [], [], 0
    for example in tfds.as_numpy(dataset.batch(1024)):
        missing = [k for k in keys if k not in example]
        if missing:
            raise ValueError(
                f"tfds:{name} has no feature {missing[0]!r}; its features are "
                f"{', '.join(example)} (name inputs and targets with --keys X,Y)."
            )
        xs.append(example[keys[0]])
        ys.append(example[keys[1]])
        count += len(xs[-1])
        if limit is not None and count >= limit:
            break
    if not xs:
        raise ValueError(f"tfds:{name} split {split!r} holds no samples.")
    return np.concatenate(xs), np.concatenate(ys)


def mlp(hidden: Sequence[int] = (32,), num_classes: int = 10, activation: str = "tanh"):
    """A Flax linen MLP: Dense layers of widths ``hidden`` then ``num_classes`` logits.

    With the defaults on 64 inputs it has 2,410 parameters.
    """
    from flax import linen as nn

    act = getattr(nn, activation) if activation != "tanh" else jnp.tanh

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for width in hidden:
                x = act(nn.Dense(width)(x))
            return nn.Dense(num_classes)(x)

    return MLP()


def cross_entropy_loss(apply_fn: Callable[[Any, jax.Array], jax.Array]):
    """``loss(params, (x, y))``: mean softmax cross-entropy of the logits
    ``apply_fn({'params': params}, x)`` against integer labels ``y``."""

    def loss(params, batch):
        x, y = batch
        logits = apply_fn({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss


def train_classifier(
    loss: Callable,
    params: Any,
    data: tuple[np.ndarray, np.ndarray],
    *,
    steps: int = 300,
    learning_rate: float = 1e-2,
    every: int | None = None,
    callback: Callable[[int, Any], None] | None = None,
) -> Any:
    """Full-batch Adam for ``steps`` steps, compiled as one ``lax.scan``; returns the params.

    With ``every`` and ``callback``, ``callback(step, params)`` is called at step 0, every
    ``every`` steps and at the end (the scan runs in pieces between the calls, the
    optimiser's state carried over: the same steps as without them, for
    :mod:`jax_spectral.training`)."""
    optimizer = optax.adam(learning_rate)
    batch = jax.tree_util.tree_map(jnp.asarray, data)

    @functools.partial(jax.jit, static_argnums=2)
    def run(params, state, length):
        def step(carry, _):
            params, state = carry
            grads = jax.grad(loss)(params, batch)
            updates, state = optimizer.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(step, (params, state), None, length=length)[0]

    state = optimizer.init(params)
    if callback is None or every is None:
        return run(params, state, steps)[0]
    done = 0
    callback(0, params)
    while done < steps:
        length = min(every, steps - done)
        params, state = run(params, state, length)
        done += length
        callback(done, params)
    return params
