"""oneDNN convolutions compiled as XLA FFI handlers, for :mod:`jax_spectral.onednn`.

This package holds one shared library and nothing to import from it directly:
:mod:`jax_spectral.onednn` loads it, registers its three handlers with
``jax.ffi.register_ffi_target`` and calls them through ``jax.ffi.ffi_lowering``.
"""

from pathlib import Path

LIBRARY = Path(__file__).with_name("onednn_conv.so")
