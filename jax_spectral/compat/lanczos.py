"""``lanczos.py`` of the original package: ``lanczos_alg(matrix_vector_product, dim, order,
rng_key) -> (tridiag, vecs)`` (see :func:`jax_spectral.lanczos.lanczos_alg`)."""

from ..lanczos import lanczos_alg as lanczos_alg

__all__ = ["lanczos_alg"]
