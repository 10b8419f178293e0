"""The JAX interfaces outside ``jax``'s stable API that this package uses, in one place.

:mod:`jax_spectral.onednn` defines primitives (their abstract evaluation, lowering,
differentiation and batching rules) and :mod:`jax_spectral.rewrite` re-evaluates jaxprs
equation by equation. Both need names that JAX keeps in ``jax.extend`` and
``jax.interpreters``, whose homes have moved between releases; when one moves again, this
module is the only one to change. The minimum JAX in ``pyproject.toml`` is the one
``.ci/run`` tests.
"""

from __future__ import annotations

from typing import Any

from jax.core import ShapedArray, Tracer
from jax.extend.core import ClosedJaxpr, Literal, Primitive
from jax.interpreters import ad, batching, mlir

__all__ = [
    "ClosedJaxpr",
    "Literal",
    "Primitive",
    "ShapedArray",
    "Tracer",
    "ad",
    "batching",
    "bind_equation",
    "mlir",
]


def bind_equation(eqn: Any, inputs: list) -> list:
    """Apply the primitive of jaxpr equation ``eqn`` to ``inputs`` (with the equation's
    source information and other context), as ``jax.core.eval_jaxpr`` does; returns the
    list of its outputs."""
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        result = eqn.primitive.bind(*inputs, **params)
    return result if eqn.primitive.multiple_results else [result]
