"""Keras models as Flax-style ``(apply_fn, variables)`` pairs.

``to_flax(model)`` returns ``variables``, a Flax-style pytree

    {"params": {layer_name: {"kernel": ..., "bias": ...}, ...},
     "batch_stats": {bn_layer_name: {"mean": ..., "var": ...}}, ...}

and ``apply_fn(variables, x, train=False)``, a pure JAX function. Two ways to get there:

* ``mode="module"``: Sequential and single-input, single-output Functional models made of
  the standard layers (Dense, Conv1D/2D, MaxPooling/AveragePooling 1D/2D,
  GlobalAveragePooling 1D/2D, Flatten, BatchNormalization, LayerNormalization, Dropout,
  Activation, ReLU, Embedding, Add, Concatenate) are translated into a ``flax.linen``
  module with the weights copied (a layer used twice shares its weights);
  ``apply_fn`` is that module's ``apply``. A layer outside this list raises ``ValueError``
  naming it.
* ``mode="stateless"``: any model built under the JAX backend, through
  ``model.stateless_call``; the variables keep Keras's names (``params`` and, for
  BatchNormalization, ``batch_stats`` with ``moving_mean``/``moving_variance``; other
  non-trainable state under ``state``).

``mode="auto"`` (the default) translates when every layer is supported and falls back to
``stateless`` otherwise. Either way ``train=False`` uses BatchNormalization's moving
statistics and turns Dropout off; ``train=True`` uses batch statistics without updating
anything (the updated statistics are discarded) and needs ``rngs={"dropout": key}`` for
Dropout in the translated module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .closure import _keras, check_model

__all__ = ["to_flax"]

_ACTIVATIONS: dict[str, Callable] = {  # Keras activation name -> JAX function
    "linear": lambda x: x,
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "softmax": jax.nn.softmax,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "elu": jax.nn.elu,
    "softplus": jax.nn.softplus,
}


def _activation(keras, layer, fn) -> Callable:
    """The JAX function for a Keras activation, matched by identity (not by name: a
    ``jax.nn.gelu`` or ``keras.ops.gelu`` is the tanh approximation, Keras's is exact)."""
    if fn is None:
        return _ACTIVATIONS["linear"]
    for name, jax_fn in _ACTIVATIONS.items():
        if fn is keras.activations.get(name):
            return jax_fn
    raise ValueError(
        f"layer '{layer.name}' uses the activation {getattr(fn, '__name__', fn)!r}, which "
        f"to_flax does not translate (supported: the Keras activations {sorted(_ACTIVATIONS)}"
        "). Use to_flax(model, mode='stateless'), which runs any layer through Keras."
    )


def _set(tree: dict, path: list[str], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: list[str]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _relative_path(model, variable) -> list[str]:
    parts = variable.path.split("/")
    if parts and parts[0] == model.name:
        parts = parts[1:]
    return parts


# -- the generic path: stateless_call ---------------------------------------------------------


def _unique_paths(model, variables) -> list[list[str]]:
    """Relative variable paths, made unique (a subclassed model may name two layers alike)."""
    seen: dict[str, int] = {}
    paths = []
    for v in variables:
        path = _relative_path(model, v)
        key = "/".join(path)
        if key in seen:
            seen[key] += 1
            path = path[:-1] + [f"{path[-1]}_{seen[key]}"]
        else:
            seen[key] = 0
        paths.append(path)
    return paths


def _stateless(keras, model) -> tuple[Callable, dict]:
    all_vars = list(model.trainable_variables) + list(model.non_trainable_variables)
    paths = _unique_paths(model, all_vars)
    num_trainable = len(model.trainable_variables)
    slots = []  # (collection, path) for every variable, trainable first
    variables: dict = {"params": {}}
    for i, (v, path) in enumerate(zip(all_vars, paths, strict=True)):
        if i < num_trainable:
            collection = "params"
        elif v.name in ("moving_mean", "moving_variance"):
            collection = "batch_stats"
        else:
            collection = "state"
        slots.append((collection, path))
        _set(variables.setdefault(collection, {}), path, jnp.asarray(v.value))

    def apply_fn(variables, x, train: bool = False):
        values = [_get(variables[c], p) for c, p in slots]
        # The model's own __call__ (which passes `training` only where `call` takes it),
        # with every variable substituted and every assignment discarded.
        with keras.StatelessScope(state_mapping=list(zip(all_vars, values, strict=True))):
            return model(x, training=train)

    return apply_fn, variables


# -- the translated path: a flax.linen module ---------------------------------------------------


_ADVICE = "Use to_flax(model, mode='stateless'), which runs any layer through Keras."


def _layer_spec(keras, layer) -> tuple[str, dict, dict, dict] | None:
    """(kind, settings, params, batch_stats) of a supported layer; None for no-ops."""
    weights = {w.name: jnp.asarray(w.value) for w in layer.weights}
    _check_channels_last(layer)
    if isinstance(layer, keras.layers.InputLayer):
        return None
    _check_plain_weights(layer)
    make_spec = _spec_makers(keras.layers).get(type(layer))
    if make_spec is None:
        raise ValueError(
            f"to_flax cannot translate layer '{layer.name}' of type {type(layer).__name__}. "
            "Translated layers: Dense, Conv1D/2D, Max/AveragePooling1D/2D, "
            "GlobalAveragePooling1D/2D, Flatten, BatchNormalization, LayerNormalization, "
            "Dropout, Activation, ReLU, Embedding, Add, Concatenate. Use to_flax(model, "
            "mode='stateless') to run any layer through model.stateless_call."
        )
    return make_spec(keras, layer, weights)


def _check_channels_last(layer) -> None:
    """Refuse a channels_first layer: the translated ops assume channels last."""
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise ValueError(
            f"layer '{layer.name}' ({type(layer).__name__}) uses data_format='channels_first'; "
            "to_flax translates channels_last layers only. Use to_flax(model, mode='stateless')."
        )


def _check_plain_weights(layer) -> None:
    """Refuse weights a flax module would misrepresent: frozen, LoRA or quantized, or kept
    in another dtype than the layer computes in."""
    name, cls = layer.name, type(layer).__name__
    if layer.weights and not layer.trainable:
        raise ValueError(
            f"layer '{name}' ({cls}) is frozen (trainable=False): its weights are not "
            f"parameters of the Hessian, and a flax module would treat them as such. {_ADVICE}"
        )
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
        raise ValueError(f"layer '{name}' ({cls}) is LoRA-enabled or quantized. {_ADVICE}")
    if layer.compute_dtype != layer.variable_dtype:
        raise ValueError(
            f"layer '{name}' ({cls}) computes in {layer.compute_dtype} with "
            f"{layer.variable_dtype} weights (a mixed-precision policy). {_ADVICE}"
        )


def _spec_makers(L) -> dict[type, Callable]:
    """Keras layer class (matched exactly, not subclasses) -> its ``(keras, layer, weights)
    -> spec`` function."""
    return {
        L.Dense: _dense_spec,
        L.Conv1D: _conv_spec,
        L.Conv2D: _conv_spec,
        L.MaxPooling1D: _pool_spec,
        L.MaxPooling2D: _pool_spec,
        L.AveragePooling1D: _pool_spec,
        L.AveragePooling2D: _pool_spec,
        L.GlobalAveragePooling1D: _gap_spec,
        L.GlobalAveragePooling2D: _gap_spec,
        L.Flatten: _flatten_spec,
        L.BatchNormalization: _norm_spec,
        L.LayerNormalization: _norm_spec,
        L.Dropout: _dropout_spec,
        L.Activation: _activation_spec,
        L.ReLU: _relu_spec,
        L.Embedding: _embedding_spec,
    }


def _kernel_and_bias(layer, weights) -> dict:
    params = {"kernel": weights["kernel"]}
    if layer.use_bias:
        params["bias"] = weights["bias"]
    return params


def _dense_spec(keras, layer, weights):
    settings = {"act": _activation(keras, layer, layer.activation)}
    return "dense", settings, _kernel_and_bias(layer, weights), {}


def _conv_spec(keras, layer, weights):
    if layer.groups != 1 or layer.padding not in ("valid", "same"):
        raise ValueError(
            f"layer '{layer.name}' ({type(layer).__name__}) has groups={layer.groups}, padding="
            f"{layer.padding!r}; to_flax translates groups=1 with 'valid' or 'same' "
            f"padding only. {_ADVICE}"
        )
    params = _kernel_and_bias(layer, weights)
    settings = {
        "strides": tuple(layer.strides),
        "padding": layer.padding.upper(),
        "dilation": tuple(layer.dilation_rate),
        "act": _activation(keras, layer, layer.activation),
    }
    return "conv", settings, params, {}


def _pool_spec(keras, layer, weights):
    settings = {
        "max": "Max" in type(layer).__name__,
        "window": tuple(layer.pool_size),
        "strides": tuple(layer.strides),
        "padding": layer.padding.upper(),
    }
    return "pool", settings, {}, {}


def _gap_spec(keras, layer, weights):
    return "gap", {"keepdims": layer.keepdims}, {}, {}


def _flatten_spec(keras, layer, weights):
    return "flatten", {}, {}, {}


def _norm_spec(keras, layer, weights):
    """Batch or layer normalisation over the last axis (Keras's gamma/beta are flax's
    scale/bias; BatchNormalization's moving statistics are the batch_stats)."""
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    last = len(layer.input.shape) - 1
    if [a % (last + 1) for a in axes] != [last] or getattr(layer, "rms_scaling", False):
        raise ValueError(
            f"layer '{layer.name}' ({type(layer).__name__}) normalises axis {layer.axis}"
            + (" with rms_scaling" if getattr(layer, "rms_scaling", False) else "")
            + f"; to_flax translates last-axis normalisation only. {_ADVICE}"
        )
    params = {}
    if layer.scale:
        params["scale"] = weights["gamma"]
    if layer.center:
        params["bias"] = weights["beta"]
    settings = {"epsilon": layer.epsilon, "scale": layer.scale, "center": layer.center}
    if type(layer) is keras.layers.LayerNormalization:
        return "layernorm", settings, params, {}
    stats = {"mean": weights["moving_mean"], "var": weights["moving_variance"]}
    return "batchnorm", settings, params, stats


def _dropout_spec(keras, layer, weights):
    return "dropout", {"rate": layer.rate}, {}, {}


def _activation_spec(keras, layer, weights):
    return "act", {"act": _activation(keras, layer, layer.activation)}, {}, {}


def _relu_spec(keras, layer, weights):
    if layer.max_value is not None or layer.negative_slope or layer.threshold:
        raise ValueError(f"layer '{layer.name}': only a plain ReLU() is translated.")
    return "act", {"act": jax.nn.relu}, {}, {}


def _embedding_spec(keras, layer, weights):
    if layer.mask_zero:
        raise ValueError(
            f"layer '{layer.name}' uses mask_zero=True (masks are not kept). {_ADVICE}"
        )
    return "embed", {}, {"embedding": weights["embeddings"]}, {}


def _apply_layer(nn, kind, s, name, args, modules, train):
    """One translated layer; ``modules`` keeps one flax submodule per Keras layer (shared
    layers reuse it)."""

    def sub(make):
        if name not in modules:
            modules[name] = make()
        return modules[name]

    if kind == "add":
        out = args[0]
        for a in args[1:]:
            out = out + a
        return out
    if kind == "concat":
        return jnp.concatenate(args, axis=s["axis"])
    (x,) = args
    if kind not in _APPLY:
        raise AssertionError(kind)  # every kind made by _layer_spec is handled
    return _APPLY[kind](nn, s, x, sub=sub, name=name, train=train)


# Each ``(nn, settings, x, *, sub, name, train) -> y``; ``sub(make)`` is the layer's flax
# submodule, made by ``make`` on first use.


def _apply_dense(nn, s, x, *, sub, name, train):
    return s["act"](sub(lambda: nn.Dense(s["features"], use_bias=s["bias"], name=name))(x))


def _apply_conv(nn, s, x, *, sub, name, train):
    conv = sub(
        lambda: nn.Conv(
            s["features"],
            s["kernel_size"],
            s["strides"],
            s["padding"],
            kernel_dilation=s["dilation"],
            use_bias=s["bias"],
            name=name,
        )
    )
    return s["act"](conv(x))


def _apply_pool(nn, s, x, *, sub, name, train):
    if s["max"]:
        return nn.max_pool(x, s["window"], s["strides"], s["padding"])
    return nn.avg_pool(x, s["window"], s["strides"], s["padding"], count_include_pad=False)


def _apply_gap(nn, s, x, *, sub, name, train):
    return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)), keepdims=s["keepdims"])


def _apply_flatten(nn, s, x, *, sub, name, train):
    return x.reshape((x.shape[0], -1))


def _norm_options(s, name):
    """The Flax options of a Keras normalisation layer (exact variance, as Keras)."""
    return dict(
        epsilon=s["epsilon"],
        use_scale=s["scale"],
        use_bias=s["center"],
        use_fast_variance=False,
        name=name,
    )


def _apply_batchnorm(nn, s, x, *, sub, name, train):
    options = _norm_options(s, name)
    return sub(lambda: nn.BatchNorm(use_running_average=not train, **options))(x)


def _apply_layernorm(nn, s, x, *, sub, name, train):
    return sub(lambda: nn.LayerNorm(**_norm_options(s, name)))(x)


def _apply_dropout(nn, s, x, *, sub, name, train):
    return nn.Dropout(s["rate"], deterministic=not train)(x)


def _apply_act(nn, s, x, *, sub, name, train):
    return s["act"](x)


def _apply_embed(nn, s, x, *, sub, name, train):
    return sub(lambda: nn.Embed(s["num"], s["features"], name=name))(x.astype(jnp.int32))


_APPLY: dict[str, Callable] = {
    "dense": _apply_dense,
    "conv": _apply_conv,
    "pool": _apply_pool,
    "gap": _apply_gap,
    "flatten": _apply_flatten,
    "batchnorm": _apply_batchnorm,
    "layernorm": _apply_layernorm,
    "dropout": _apply_dropout,
    "act": _apply_act,
    "embed": _apply_embed,
}


def _module(specs, input_id, output_id):
    from flax import linen as nn

    class KerasGraph(nn.Module):
        """The Keras layer graph as a flax module: ``specs`` in topological order."""

        @nn.compact
        def __call__(self, x, train: bool = False):
            values = {input_id: x}
            modules: dict = {}
            for name, kind, settings, inputs, output in specs:
                args = [values[i] for i in inputs]
                values[output] = _apply_layer(nn, kind, settings, name, args, modules, train)
            return values[output_id]

    return KerasGraph()


def _layer_graph(keras, model):
    """``[(layer, input ids, output id)]`` in execution order, and the model's in/out ids."""
    if isinstance(model, keras.Sequential):
        layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
        return [(layer, [i], i + 1) for i, layer in enumerate(layers)], 0, len(layers)
    nodes_by_depth = getattr(model, "_nodes_by_depth", None)
    if nodes_by_depth is None or len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(
            f"to_flax translates Sequential models and Functional models with one input and "
            f"one output; '{model.name}' is a {type(model).__name__}. Use to_flax(model, "
            "mode='stateless')."
        )
    graph = []
    for depth in sorted(nodes_by_depth, reverse=True):
        for node in nodes_by_depth[depth]:
            if isinstance(node.operation, keras.layers.InputLayer):
                continue
            op = node.operation
            if not isinstance(op, keras.layers.Layer):
                raise ValueError(
                    f"'{model.name}' applies the operation {type(op).__name__} "
                    f"('{op.name}') between layers; to_flax translates layers only. Use "
                    "to_flax(model, mode='stateless')."
                )
            if len(node.output_tensors) != 1 or node.arguments.kwargs:
                raise ValueError(
                    f"layer '{op.name}' has several outputs or call arguments "
                    f"({sorted(node.arguments.kwargs)}); use to_flax(model, mode='stateless')."
                )
            graph.append(
                (node.operation, [id(t) for t in node.input_tensors], id(node.output_tensors[0]))
            )
    return graph, id(model.inputs[0]), id(model.outputs[0])


def _translate(keras, model) -> tuple[Callable, dict]:
    graph, input_id, output_id = _layer_graph(keras, model)
    specs, params, stats = [], {}, {}
    for layer, inputs, output in graph:
        if type(layer) is keras.layers.Add:
            specs.append((layer.name, "add", {}, inputs, output))
            continue
        if type(layer) is keras.layers.Concatenate:
            specs.append((layer.name, "concat", {"axis": layer.axis}, inputs, output))
            continue
        spec = _layer_spec(keras, layer)
        if spec is None:
            continue
        kind, settings, p, s = spec
        settings = dict(settings)
        if kind in ("dense", "conv"):
            settings["features"] = p["kernel"].shape[-1]
            settings["bias"] = "bias" in p
            settings["kernel_size"] = tuple(p["kernel"].shape[:-2])
        if kind == "embed":
            settings["num"], settings["features"] = p["embedding"].shape
        specs.append((layer.name, kind, settings, inputs, output))
        if p:
            params[layer.name] = p
        if s:
            stats[layer.name] = s
    module = _module(specs, input_id, output_id)
    variables = {"params": params}
    if stats:
        variables["batch_stats"] = stats

    def apply_fn(variables, x, train: bool = False, rngs=None):
        if train and "batch_stats" in variables:
            out, _ = module.apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])
            return out
        return module.apply(variables, x, train=train, rngs=rngs)

    apply_fn.module = module
    return apply_fn, variables


def to_flax(model: Any, *, mode: str = "auto") -> tuple[Callable, dict]:
    """Convert a built Keras 3 model (JAX backend) to ``(apply_fn, variables)``.

    See the module docstring for the two modes. ``apply_fn(variables, x, train=False)`` is
    pure; ``variables["params"]`` is what :func:`jax_spectral.hessian_operator` and
    :func:`jax_spectral.hvp` differentiate.

    The flax module's ``params`` are keyed by layer name, so ``ravel_pytree`` orders them
    by sorted name, not in ``model.trainable_variables`` order (the layout of
    ``approximate_hessian``'s ``V``); map between the two by layer and weight name.

    Raises
    ------
    ValueError
        ``mode="module"`` and a layer, setting or model type that is not translated (the
        message names it; frozen, LoRA, quantized and mixed-precision layers included); an
        unknown ``mode``; an unbuilt model.
    """
    if mode not in ("auto", "module", "stateless"):
        raise ValueError(f"mode must be 'auto', 'module' or 'stateless', got {mode!r}.")
    keras = _keras()
    check_model(model)
    if mode == "stateless":
        return _stateless(keras, model)
    try:
        return _translate(keras, model)
    except ValueError:
        if mode == "module":
            raise
        return _stateless(keras, model)
