"""The original package's JAX modules, under the names its users import.

google/spectral-density's ``jax/`` folder held three modules; here they are thin wrappers
over jax-spectral's core, with the same function names, arguments and results::

    # was: from spectral_density import density as density_lib, hessian_computation, lanczos
    from jax_spectral.compat import density as density_lib, hessian_computation, lanczos

The original's faults are fixed, not copied: ``get_hvp_fn`` takes the exact mean over
samples (the original divided by the number of batches), ``lanczos_alg`` handles
breakdown and reorthogonalises with matrix products, the density keeps nodes inside its
grid. The Keras (``tf2/``) modules live in :mod:`keras_bridge`.
"""

from . import density as density
from . import hessian_computation as hessian_computation
from . import lanczos as lanczos

__all__ = ["density", "hessian_computation", "lanczos"]
