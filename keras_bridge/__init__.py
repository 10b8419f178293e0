"""Keras bridge for jax-spectral: the original package's ``approximate_hessian`` on the JAX
engine, and Keras loss closures as pure JAX functions.

Requires Keras 3 with ``KERAS_BACKEND=jax`` set before Keras is imported
(``pip install 'jax-spectral[keras]'``). Importing this package does not import Keras.

    from keras_bridge import lanczos_algorithm
    V, T = lanczos_algorithm.approximate_hessian(model, loss_fn, dataset, order)

``lanczos_algorithm.lanczos_algorithm`` and ``matrix_vector_product.model_hessian_vector_product``
keep the original package's other TF2 entry points. ``pure_model`` and
``loading.output_loss`` give the model and the loss on its outputs separately, for
``jax_spectral.ggn_operator`` and ``fisher_operator``; ``layer_blocks`` groups the weights
by layer for ``wrt=``. ``spectrum_callback`` records the spectrum every N epochs of
``model.fit`` (``jax_spectral.training``).
"""

from . import lanczos_algorithm as lanczos_algorithm
from . import matrix_vector_product as matrix_vector_product
from .callbacks import spectrum_callback as spectrum_callback
from .closure import layer_blocks as layer_blocks
from .closure import pure_loss as pure_loss
from .closure import pure_model as pure_model
from .closure import trainable_values as trainable_values
from .convert import to_flax as to_flax
from .lanczos_algorithm import approximate_hessian as approximate_hessian

__all__ = [
    "approximate_hessian",
    "layer_blocks",
    "lanczos_algorithm",
    "matrix_vector_product",
    "pure_loss",
    "pure_model",
    "spectrum_callback",
    "to_flax",
    "trainable_values",
]
