"""Progress reporting for long loops: a tqdm bar with rate and ETA, a callback, or silence.

Every long-running function takes ``progress``:

* ``False`` (the default in the library): silent;
* ``True``: a tqdm bar on stderr with the step count, time per step and ETA;
* a callable: called as ``progress(done, total, elapsed_seconds)`` after each step.

Host-driven loops report after every step; compiled loops, which run in segments of about
three seconds (see :func:`jax_spectral.lanczos.run_steps`), after every segment, from the
host: nothing is compiled into the program, so progress works on meshes too. Under the
caller's own ``jit`` or ``vmap`` progress is off (there is nothing to report to while
tracing). On several processes (``jax.distributed``) the bar shows on process 0 only; a
callable is called on every process.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Progress"]

ProgressArg = bool | Callable[[int, int, float], None] | None


class Progress:
    """One reporter for a loop of ``total`` steps; use as a context manager."""

    def __init__(self, progress: ProgressArg, total: int, desc: str, unit: str = "step"):
        if progress not in (None, False, True) and not callable(progress):
            raise TypeError(f"progress must be a bool or a callable, got {progress!r}.")
        self.total = int(total)
        self.done = 0
        self._callback = progress if callable(progress) and progress is not True else None
        self._started = time.perf_counter()
        self._bar = None
        if progress is True and _shows_bar():
            from tqdm import tqdm  # plain text, also in notebooks (no ipywidgets needed)

            # A terminal that reports zero columns (some pseudo-terminals) would get no bar.
            width = _stderr_columns()
            self._bar = tqdm(
                total=self.total,
                desc=desc,
                unit=unit,
                file=sys.stderr,
                dynamic_ncols=width != 0,
                ncols=100 if width == 0 else None,
            )

    @property
    def enabled(self) -> bool:
        return self._bar is not None or self._callback is not None

    def update_to(self, done: int, **info: Any) -> None:
        """Report that ``done`` of ``total`` steps are finished (never moves backwards)."""
        done = min(int(done), self.total)
        if done <= self.done:
            return
        step, self.done = done - self.done, done
        if self._bar is not None:
            if info:
                self._bar.set_postfix(info, refresh=False)
            self._bar.update(step)
        elif self._callback is not None:
            self._callback(self.done, self.total, time.perf_counter() - self._started)

    def update(self, n: int = 1, **info: Any) -> None:
        self.update_to(self.done + n, **info)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _shows_bar() -> bool:
    """Whether this process draws bars: process 0 of a multi-process run, or the only one."""
    import jax

    return jax.process_index() == 0


def _stderr_columns() -> int | None:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError, AttributeError):  # not a terminal, or no file descriptor
        return None
