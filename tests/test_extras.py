"""Each documented extra is enough for its examples: a fresh virtual environment with only
that extra installed runs the section as written (pip reaches only the package index)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _venv_with(extra: str, where: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=300)
    python = where / "bin" / "python"
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "-e", f"{ROOT}[{extra}]"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return python


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "MPLBACKEND")}


def test_the_keras_extra_runs_the_keras_section_and_command(tmp_path):
    """With only [keras], the section's snippet needed TensorFlow and the command on the
    bundled digits needed scikit-learn (the demo extra)."""
    python = _venv_with("keras", tmp_path / "venv")
    # The README's examples (its quick start, then Keras in ten lines) and the guide's
    # Keras section, each as written.
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"^## Keras in ten lines \(`pip install -e \"\.\[keras\]\"`\)$", readme, re.M)
    guide = (ROOT / "docs" / "guide.md").read_text()
    header = re.search(r"^## Keras models \(`pip install -e \"\.\[keras\]\"`\)$", guide, re.M)
    assert header, "the Keras section names its extra"
    section = guide[header.end() :].split("\n## ", 1)[0]
    for name, text in (("readme.py", readme), ("guide.py", section)):
        blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
        (tmp_path / name).write_text("\n".join(blocks))
    run = dict(capture_output=True, text=True, timeout=900, cwd=tmp_path, env=_env())
    for name in ("readme.py", "guide.py"):
        done = subprocess.run([str(python), name], **run)
        assert done.returncode == 0, (name, done.stderr[-3000:])
    save = (
        "import os; os.environ['KERAS_BACKEND'] = 'jax'; import keras\n"
        "m = keras.Sequential([keras.Input((64,)), keras.layers.Dense(8, activation='tanh'),"
        " keras.layers.Dense(10, activation='softmax')])\n"
        "m.compile('adam', 'sparse_categorical_crossentropy'); m.save('m.keras')\n"
    )
    done = subprocess.run([str(python), "-c", save], **run)
    assert done.returncode == 0, done.stderr[-3000:]
    command = [
        str(python),
        "-m",
        "jax_spectral",
        "keras",
        "m.keras",
        "--order",
        "10",
        "--top",
        "2",
        "--trace-matvecs",
        "6",
        "--quiet",
        "--out",
        "out",
    ]
    done = subprocess.run(command, **run)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "density.png").is_file()


def test_the_demo_extra_runs_the_demo(tmp_path):
    python = _venv_with("demo", tmp_path / "venv")
    command = [
        str(python),
        "-m",
        "jax_spectral",
        "demo",
        "--order",
        "10",
        "--train-steps",
        "20",
        "--quiet",
        "--out",
        "out",
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=_env()
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "density.png").is_file()
