"""``density.py`` of the original package: Gauss quadrature nodes and weights from
tridiagonals, and the smoothed density (see :mod:`jax_spectral.density`)."""

from ..density import eigv_to_density as eigv_to_density
from ..density import tridiag_to_density as tridiag_to_density
from ..density import tridiag_to_eigv as tridiag_to_eigv

__all__ = ["eigv_to_density", "tridiag_to_density", "tridiag_to_eigv"]
