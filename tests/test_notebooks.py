"""The notebooks run top to bottom (any error fails the test) and draw their figures."""

import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

pytestmark = pytest.mark.slow  # executes the notebooks (TensorFlow, Jupyter kernels)


NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize(
    "name, figures, needs, printed",
    [
        ("jax_example.ipynb", 2, [], "top eigenvalues (dense)"),
        ("keras_example.ipynb", 3, ["keras", "tensorflow_datasets"], "train (1500, 8, 8, 1)"),
        ("training_spectra.ipynb", 4, [], "outliers after training: plain 9"),
    ],
)
def test_notebook_runs_and_draws_its_figures(name, figures, needs, printed, tmp_path, monkeypatch):
    for module in needs:
        pytest.importorskip(module)
    # The kernel inherits the environment: a file-only backend (test_plot sets MPLBACKEND=Agg)
    # would swallow the figures that the notebook's inline backend shows.
    monkeypatch.delenv("MPLBACKEND", raising=False)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    stored = [c for c in notebook.cells if c.cell_type == "code"]
    assert stored and not any(c.outputs for c in stored), "store notebooks with outputs cleared"
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    started = time.perf_counter()
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    # Timings are measured, not asserted (a busy machine is not a failure): shown with -s.
    print(f"{name} ran in {time.perf_counter() - started:.0f} s")
    images = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    assert len(images) >= figures  # the density plots (and the heatmaps) are drawn
    text = "".join(o.get("text", "") for c in stored for o in c.outputs)
    assert printed in text  # e.g. the Keras notebook really read the data through tfds
