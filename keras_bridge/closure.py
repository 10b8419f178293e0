"""Keras loss closures as pure JAX functions of the trainable weights.

A closure written for the original package, ``loss_function(model, inputs)``, calls the
model and a Keras loss. Under Keras 3 with the JAX backend, running it inside
``keras.StatelessScope`` with the trainable variables mapped to given arrays makes it a pure
function ``loss(params, batch)`` of a list of arrays (one per entry of
``model.trainable_variables``, in that order): differentiable by ``jax.jvp`` of
``jax.grad``, jit-able, and with every assignment made during the call (BatchNormalization
moving statistics, seed generator states) captured by the scope and discarded, so the
model's state is never changed and no tracer is stored in it.

Like TensorFlow's ``GradientTape`` in the original package, a non-scalar loss (for example
``keras.losses.mse`` without a reduction, which returns one value per sample) is
differentiated as its sum; a warning says so once per closure.
"""

from __future__ import annotations

import os
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["check_model", "pure_loss", "trainable_values"]


def _keras():
    try:
        import keras
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("keras_bridge needs Keras 3: pip install 'jax-spectral[keras]'") from err
    if keras.backend.backend() != "jax":
        raise RuntimeError(
            f"keras_bridge needs the JAX backend of Keras, but Keras runs on "
            f"'{keras.backend.backend()}'. Set KERAS_BACKEND=jax in the environment before "
            "keras (or tensorflow) is first imported, e.g. os.environ['KERAS_BACKEND'] = 'jax' "
            "at the top of the script. A model saved under another backend loads under JAX "
            "with keras.saving.load_model('model.keras')."
        )
    return keras


def check_model(model: Any) -> None:
    """Raise a clear error for a model the bridge cannot use."""
    keras = _keras()
    if not isinstance(model, keras.Model):
        raise TypeError(f"expected a keras.Model, got {type(model).__name__}.")
    if not model.built:
        raise ValueError(
            "the model is not built, so it has no weights yet. Build it first: "
            "model.build(input_shape), call it once on a batch, or start it with keras.Input."
        )
    if not model.trainable_variables:
        raise ValueError(
            "the model has no trainable weights (model.trainable is False or all its layers "
            "are frozen or parameter-free): its Hessian has no parameters."
        )
    for variable in model.trainable_variables:
        if not isinstance(variable.value, jax.Array):
            raise TypeError(
                f"variable {variable.path} holds a {type(variable.value).__name__}, not a JAX "
                "array: this model was built under another Keras backend. Save it "
                "(model.save('model.keras')) and load it in a process started with "
                f"KERAS_BACKEND=jax (now {os.environ.get('KERAS_BACKEND', 'unset')})."
            )


def trainable_values(model: Any) -> list[jax.Array]:
    """The trainable weights as a list of arrays, in ``model.trainable_variables`` order."""
    check_model(model)
    return [jnp.asarray(v.value) for v in model.trainable_variables]


def _tensorflow_frame(err: BaseException, loss_function: Callable) -> str | None:
    """If TensorFlow raised from inside the user's closure, the closure line that called it."""
    frames = traceback.extract_tb(err.__traceback__)
    if not any(f"{os.sep}tensorflow{os.sep}" in frame.filename for frame in frames):
        return None
    code = getattr(loss_function, "__code__", None)
    user = [f for f in frames if code is not None and f.filename == code.co_filename]
    if user:
        return f"line {user[-1].lineno}: {user[-1].line}"
    return "an unknown line"


def pure_loss(model: Any, loss_function: Callable[[Any, Any], Any]) -> Callable:
    """``loss(params, batch)``: ``loss_function(model, batch)`` with the trainable variables
    set to ``params`` (a list in ``model.trainable_variables`` order), pure and traceable.

    Raises ``TypeError`` when the closure applies TensorFlow operations to the JAX values
    while being traced (under ``jax.grad``/``jit``, as in every HVP), naming the closure's
    line; called eagerly on concrete arrays TensorFlow may accept them silently.
    """
    keras = _keras()
    check_model(model)
    variables = list(model.trainable_variables)
    warned = []

    def loss(params, batch):
        if len(params) != len(variables):
            raise ValueError(
                f"expected {len(variables)} weight arrays (one per trainable variable), "
                f"got {len(params)}."
            )
        mapping = list(zip(variables, params, strict=True))
        # collect_losses: losses added during the call (activity regularizers) are visible
        # as model.losses inside the closure, and the layers' own loss lists are not reset.
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True):
            try:
                value = loss_function(model, batch)
            except Exception as err:
                where = _tensorflow_frame(err, loss_function)
                if where is None:
                    raise
                raise TypeError(
                    f"loss_function called a TensorFlow operation on JAX values ({where}). "
                    "Under KERAS_BACKEND=jax the model returns JAX arrays: use keras.ops "
                    "(keras.ops.mean, keras.ops.square, ...) or keras.losses / "
                    "tf.keras.losses, which follow the Keras backend, instead of tf.* "
                    f"functions. TensorFlow said: {type(err).__name__}: {err}"
                ) from err
        value = jnp.asarray(value)
        if value.ndim:
            if not warned:
                warned.append(True)
                code = getattr(loss_function, "__code__", None)
                warnings.warn_explicit(  # attributed to the closure, not to JAX's tracing
                    f"loss_function returned an array of shape {value.shape}; it is "
                    "differentiated as its sum, as TensorFlow's GradientTape did in the "
                    "original package. Reduce it in the closure (e.g. keras.ops.mean) for a "
                    "mean loss.",
                    UserWarning,
                    filename=code.co_filename if code else "<loss_function>",
                    lineno=code.co_firstlineno if code else 0,
                )
            value = jnp.sum(value)
        return value

    return loss


def pure_model(model: Any, *, training: bool = False) -> Callable:
    """``model_fn(params, inputs)``: ``model(inputs, training=training)`` with the trainable
    variables set to ``params`` (a list in ``model.trainable_variables`` order), pure and
    traceable: the ``model`` of :func:`jax_spectral.ggn_operator` and
    :func:`jax_spectral.fisher_operator`. Assignments during the call (BatchNormalization
    statistics, seed generators) are discarded."""
    keras = _keras()
    check_model(model)
    variables = list(model.trainable_variables)

    def model_fn(params, inputs):
        if len(params) != len(variables):
            raise ValueError(
                f"expected {len(variables)} weight arrays (one per trainable variable), "
                f"got {len(params)}."
            )
        mapping = list(zip(variables, params, strict=True))
        with keras.StatelessScope(state_mapping=mapping):
            return jnp.asarray(model(inputs, training=training))

    return model_fn


def weight_names(model: Any) -> list[str]:
    """The trainable variables' paths (``"dense/kernel"``), in ``params`` order."""
    return [getattr(v, "path", v.name) for v in model.trainable_variables]


def layer_blocks(model: Any) -> dict[str, Callable]:
    """``{layer path: wrt}`` grouping the trainable variables by the layer that owns them
    (a variable's path without its last part), for ``wrt=`` on the bridge's params list."""
    groups: dict[str, set[int]] = {}
    for index, name in enumerate(weight_names(model)):
        groups.setdefault(name.rsplit("/", 1)[0], set()).add(index)

    def block(indices):
        return lambda path, _leaf: path[0].idx in indices

    return {layer: block(indices) for layer, indices in groups.items()}
