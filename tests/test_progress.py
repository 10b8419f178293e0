"""Progress bars on a real terminal (a pseudo-terminal), and silence when turned off."""

import os
import struct
import subprocess
import sys

import pytest

pty = pytest.importorskip("pty")

pytestmark = pytest.mark.slow  # a subprocess on a pseudo-terminal


CODE = """
import sys, jax, jax.numpy as jnp
from jax_spectral import lanczos
a = jnp.diag(jnp.arange(1.0, 41.0))
lanczos(lambda v: a @ v, jax.random.key(0), 6, dim=40, loop="host", progress=sys.argv[1] == "on")
print("done")
"""


def _stderr_on_a_terminal(flag, columns=100):
    controller, terminal = pty.openpty()
    fcntl = pytest.importorskip("fcntl")
    termios = pytest.importorskip("termios")
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-c", CODE, flag], stdout=subprocess.PIPE, stderr=terminal
    )
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        chunks.append(chunk)
    out, _ = proc.communicate(timeout=300)
    os.close(controller)
    assert proc.returncode == 0 and out.strip() == b"done"
    return b"".join(chunks).decode(errors="replace")


def test_bar_on_a_terminal_and_silence_when_disabled():
    shown = _stderr_on_a_terminal("on")
    assert "lanczos" in shown and "6/6" in shown and "step/s" in shown  # steps, rate
    assert "\r" in shown  # redrawn in place, as a bar on a terminal
    assert "lanczos" not in _stderr_on_a_terminal("off")
    # A pseudo-terminal that reports zero columns still gets a bar.
    assert "6/6" in _stderr_on_a_terminal("on", columns=0)
