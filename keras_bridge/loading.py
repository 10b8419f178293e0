"""Saved Keras models for the command line: load, pick the loss, shape the inputs.

Used by ``jax-spectral keras MODEL.keras``; every failure is a ``ValueError`` (or
``FileNotFoundError``) with a one-line message naming the file or the setting.
"""

from __future__ import annotations

import functools
import inspect
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .closure import _keras

__all__ = ["check_targets", "load_model", "loss_closure", "shape_inputs"]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else type(err).__name__


def load_model(path: str | Path, *, safe_mode: bool = True) -> Any:
    """``keras.saving.load_model`` under the JAX backend, with one-line errors.

    ``safe_mode=False`` lets Keras run Python code stored in the file (``Lambda`` layers):
    only for files you trust."""
    keras = _keras()  # checks the backend

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no model file {str(path)!r}.")
    if file.suffix not in (".keras", ".h5", ".hdf5"):
        raise ValueError(f"{path}: expected a Keras model saved as .keras (or .h5).")
    if file.suffix == ".keras" and not zipfile.is_zipfile(file):
        raise ValueError(
            f"{path}: not a Keras archive (a .keras file is a zip written by "
            "model.save); was another file renamed?"
        )
    if file.suffix != ".keras" and file.read_bytes()[:8] != b"\x89HDF\r\n\x1a\n":
        raise ValueError(f"{path}: not an HDF5 file, as a {file.suffix} model must be.")
    try:
        with warnings.catch_warnings():
            # A model compiled but never trained has no optimizer variables to restore.
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model = keras.saving.load_model(file, compile=True, safe_mode=safe_mode)
    except Exception as err:  # Keras raises many types for unreadable files
        text = _first_line(err)
        if "safe_mode" in str(err):
            text = (
                "it holds Python code (a Lambda layer), which is not run by default; "
                "--unsafe-load (load_model(..., safe_mode=False)) runs it: only for a file "
                "you trust"
            )
        raise ValueError(f"{path}: Keras could not load it: {text}") from None
    if not model.trainable_variables:
        raise ValueError(f"{path}: the model has no trainable weights.")
    return model


def loss_closure(model: Any, name: str | None = None, *, from_logits: bool = False):
    """``loss_fn(model, (x, y))``: the mean of a Keras loss of ``model(x)`` against ``y``.

    ``name`` is any name ``keras.losses.get`` knows (``"sparse_categorical_crossentropy"``,
    ``"mse"``, ...); without it, the loss the model was compiled with when saved.
    """
    import keras

    fn = _keras_loss(model, name, from_logits)

    def loss_fn(model, batch):
        x, y = batch
        return keras.ops.mean(fn(y, model(x, training=False)))

    return loss_fn


def output_loss(model: Any, name: str | None = None, *, from_logits: bool = False):
    """``loss(outputs, targets)``: the mean of the same Keras loss as :func:`loss_closure`,
    on the model's outputs (for :func:`jax_spectral.ggn_operator` and
    :func:`jax_spectral.fisher_operator`)."""
    import keras

    fn = _keras_loss(model, name, from_logits)

    def loss(outputs, targets):
        return keras.ops.mean(fn(targets, outputs))

    return loss


def _keras_loss(model: Any, name: str | None, from_logits: bool) -> Any:
    import keras

    if name is not None:
        try:
            fn = keras.losses.get(name)
        except (ValueError, TypeError) as err:
            raise ValueError(f"unknown Keras loss {name!r}: {_first_line(err)}") from None
        if from_logits:
            fn = _with_logits(keras, name, fn)
    else:
        compiled = getattr(model, "loss", None)
        if compiled is None:
            raise ValueError(
                "the model was saved without a compiled loss; name one with --loss "
                "(e.g. --loss sparse_categorical_crossentropy)."
            )
        if isinstance(compiled, (list, tuple, dict)):
            raise ValueError(
                "the model has several compiled losses; name the one to use with --loss."
            )
        fn = keras.losses.get(compiled) if isinstance(compiled, str) else compiled
    return fn


def _with_logits(keras: Any, name: str, fn: Any) -> Any:
    """The loss ``fn`` (a function or a ``keras.losses.Loss``) taking logits."""
    if isinstance(fn, keras.losses.Loss):
        config = fn.get_config()
        if "from_logits" not in config:
            raise ValueError(f"the Keras loss {name!r} has no from_logits option.")
        return type(fn).from_config({**config, "from_logits": True})
    if "from_logits" not in inspect.signature(fn).parameters:
        raise ValueError(f"the Keras loss {name!r} has no from_logits option.")
    return functools.partial(fn, from_logits=True)


def check_targets(model: Any, y: np.ndarray, loss: str | None = None) -> None:
    """For a classifier (integer labels, one per sample, several outputs), every label must
    name an output: a label outside ``[0, classes)`` gives a loss without curvature. One-hot
    targets with a sparse loss (``loss``: its name) are refused with the loss to use."""
    y = np.asarray(y)
    shape = getattr(model, "output_shape", None)
    if not (isinstance(shape, tuple) and shape and isinstance(shape[-1], int)):
        return
    classes = shape[-1]
    if "sparse" in (loss or "") and y.ndim == 2 and y.shape[1] == classes > 1:
        raise ValueError(
            f"the targets are one-hot (shape {y.shape}) but the loss, {loss}, takes integer "
            "labels: use --loss categorical_crossentropy (add --from-logits for logits), or "
            "store integer labels."
        )
    if np.issubdtype(y.dtype, np.integer) and y.ndim == 1 and classes > 1:
        if y.min() < 0 or y.max() >= classes:
            raise ValueError(
                f"labels run from {y.min()} to {y.max()} but the model has {classes} outputs."
            )


def shape_inputs(model: Any, x: np.ndarray) -> np.ndarray:
    """``x`` as float32 reshaped to the model's input shape when only the layout differs
    (digits as 64 features for an 8x8x1 input, or the reverse)."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"the inputs have dtype {x.dtype}; expected numbers.")
    x = x.astype(np.float32)
    shape = getattr(model, "input_shape", None)
    if not isinstance(shape, tuple) or any(d is None for d in shape[1:]):
        return x
    want = tuple(shape[1:])
    if x.shape[1:] == want:
        return x
    if int(np.prod(x.shape[1:])) == int(np.prod(want)):
        return x.reshape((x.shape[0],) + want)
    raise ValueError(
        f"the model takes inputs of shape {want} per sample but the data has {x.shape[1:]}."
    )
