"""jax-spectral: Hessian eigenvalue densities, eigenpairs and traces for neural networks.

A JAX-native successor to google/spectral-density. The pipeline is

    loss + params + data -> hessian_operator, ggn_operator, fisher_operator
                            (v -> C v over the whole dataset; blocks with wrt=, sums)
                         -> lanczos (tridiagonal T, basis V)
                         -> density.tridiag_to_density (Gauss quadrature, smoothed).

``import jax_spectral`` imports JAX and NumPy only (no Keras, TensorFlow or matplotlib).
"""

from importlib.metadata import PackageNotFoundError, version

from . import density as density
from . import training as training
from .analysis import GradientShare as GradientShare
from .analysis import Outliers as Outliers
from .analysis import gradient_share as gradient_share
from .analysis import outliers as outliers
from .costs import CostEstimate as CostEstimate
from .costs import estimate as estimate
from .curvature import fisher_operator as fisher_operator
from .curvature import ggn_operator as ggn_operator
from .curvature import layer_blocks as layer_blocks
from .density import eigv_to_density as eigv_to_density
from .density import tridiag_to_density as tridiag_to_density
from .density import tridiag_to_eigv as tridiag_to_eigv
from .eigen import Eigenpairs as Eigenpairs
from .eigen import eigenpairs as eigenpairs
from .hvp import full_hessian as full_hessian
from .hvp import hvp as hvp
from .interrupt import Interrupted as Interrupted
from .lanczos import LanczosResult as LanczosResult
from .lanczos import NonFiniteError as NonFiniteError
from .lanczos import lanczos as lanczos
from .lanczos import lanczos_alg as lanczos_alg
from .lanczos import ritz as ritz
from .linop import LinearOperator as LinearOperator
from .linop import as_operator as as_operator
from .linop import deflate as deflate
from .linop import identity as identity
from .operators import CurvatureOperator as CurvatureOperator
from .operators import HessianOperator as HessianOperator
from .operators import hessian_operator as hessian_operator
from .rewrite import cpu_friendly as cpu_friendly
from .slq import SLQResult as SLQResult
from .slq import SpectralDensity as SpectralDensity
from .slq import slq as slq
from .slq import spectral_density as spectral_density
from .trace import TraceEstimate as TraceEstimate
from .trace import hutchinson as hutchinson
from .trace import hutchpp as hutchpp

try:
    __version__ = version("jax-spectral")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "CostEstimate",
    "CurvatureOperator",
    "Eigenpairs",
    "GradientShare",
    "HessianOperator",
    "Interrupted",
    "LinearOperator",
    "LanczosResult",
    "NonFiniteError",
    "Outliers",
    "SLQResult",
    "SpectralDensity",
    "TraceEstimate",
    "as_operator",
    "cpu_friendly",
    "deflate",
    "density",
    "eigenpairs",
    "eigv_to_density",
    "estimate",
    "fisher_operator",
    "full_hessian",
    "ggn_operator",
    "gradient_share",
    "hessian_operator",
    "hutchinson",
    "hutchpp",
    "hvp",
    "identity",
    "lanczos",
    "lanczos_alg",
    "layer_blocks",
    "outliers",
    "ritz",
    "slq",
    "spectral_density",
    "tridiag_to_density",
    "training",
    "tridiag_to_eigv",
]
