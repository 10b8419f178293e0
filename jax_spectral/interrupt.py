"""Ctrl-C during a long run: stop at the next step boundary and keep the finished steps.

While a Krylov loop runs, :func:`watch` takes over SIGINT (only in the main thread, and
only when Python's default handler is installed, as in a terminal or a Jupyter cell):
the first Ctrl-C sets a flag that the driver reads between segments of steps, a second one
raises ``KeyboardInterrupt`` at once (inside a long product, for a host loop). The driver
then ends the run, saves a checkpoint if it has a folder, and raises :class:`Interrupted`
carrying the partial result. Watches nest: an inner loop shares the outer one's flag.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["Interrupted", "watch"]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run. ``result`` holds what the finished steps give (for
    ``lanczos`` a :class:`~jax_spectral.LanczosResult` with ``num_steps`` valid steps, for
    ``slq`` an :class:`~jax_spectral.SLQResult`); ``steps`` and ``total`` count steps."""

    def __init__(self, message: str, result: Any = None, steps: int = 0, total: int = 0):
        super().__init__(message)
        self.result = result
        self.steps = steps
        self.total = total


class Watch:
    """The flag a driver polls; ``requested`` turns true at the first Ctrl-C."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C: stop now, inside the step
            raise KeyboardInterrupt
        self.requested = True


_ACTIVE: list[Watch] = []


@contextlib.contextmanager
def watch() -> Iterator[Watch]:
    """Catch Ctrl-C as a flag while the block runs (see the module's docstring)."""
    main = threading.current_thread() is threading.main_thread()
    if main and _ACTIVE:  # nested: the outer loop's watch
        yield _ACTIVE[-1]
        return
    current = Watch()  # in another thread: a flag of its own, which SIGINT never sets
    takes_over = main and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if not takes_over:  # another handler is in charge: leave it be (the flag stays false)
        yield current
        return
    previous = signal.signal(signal.SIGINT, current._handle)
    _ACTIVE.append(current)
    try:
        yield current
    finally:
        _ACTIVE.pop()
        signal.signal(signal.SIGINT, previous)
