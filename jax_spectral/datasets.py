"""Small real data that ships offline, and the demo model.

The default data is scikit-learn's bundled copy of the UCI handwritten digits (1,797
8x8 images, 10 classes), read from the scikit-learn installation: nothing is downloaded.
Install it with ``pip install 'jax-spectral[demo]'``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["cross_entropy_loss", "load_digits", "mlp", "train_classifier"]


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
) -> Any:
    """Full-batch Adam for ``steps`` steps, compiled as one ``lax.scan``; returns the params."""
    optimizer = optax.adam(learning_rate)
    batch = jax.tree_util.tree_map(jnp.asarray, data)

    @jax.jit
    def run(params):
        def step(carry, _):
            params, state = carry
            grads = jax.grad(loss)(params, batch)
            updates, state = optimizer.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
        return params

    return run(params)
