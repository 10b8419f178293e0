"""Argument checks shared by the public functions, so that one kind of mistake gets one
message everywhere."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ArgumentTypeError", "count", "write_atomic"]


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type where a number was expected.

    A ``TypeError``, and also a ``ValueError``: before the checks were shared, some
    functions raised one and some the other for the same mistake, and code that catches
    either keeps working.
    """


def count(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int, refusing anything but an int (bools included) below ``minimum``.

    Raises :class:`ArgumentTypeError` for a non-int and ``ValueError`` for a small one;
    both messages name the argument and what it must be.
    """
    what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(f"{name} must be {what}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be {what}, got {value!r}.")
    return int(value)


def write_atomic(
    path: str | os.PathLike, write: Callable[[Path], Any], *, durable: bool = False
) -> None:
    """Create the file ``path`` by ``write(tmp)`` under a temporary name in the same folder,
    then rename it into place (atomic on POSIX): readers and a killed process never see a
    half-written file. ``durable`` also flushes the bytes to the disk (fsync) before the
    rename, so that after a power loss the name holds the old file or the whole new one.
    The temporary name keeps the suffix (for writers that choose a format by it, or add one
    when it is missing, as ``numpy.savez`` adds ``.npz``) and holds the process id, so that
    two processes writing one file do not share a temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:  # the rename itself, recorded in the folder
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
    finally:
        tmp.unlink(missing_ok=True)
