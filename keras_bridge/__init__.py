"""Keras bridge for jax-spectral (the original package's ``approximate_hessian``).

Not implemented yet: this package is reserved for the Keras bridge issue. Importing it
works so that the distribution layout is in place; it exports nothing.
"""

__all__: list[str] = []
