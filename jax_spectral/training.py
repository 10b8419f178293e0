"""Spectra across training: record the spectrum every N steps of your own loop.

Pure functions, no framework to adopt: build the operator at the current parameters and
call :func:`record` every N steps of an optax (or any) loop; each call writes one JSON
file, ``step_<step>.json``, to a folder, and :func:`load` reads the sequence back.
``jax_spectral.plot.plot_training`` draws it as the paper's figures (the log density
against the step as a heatmap, and the top eigenvalues as curves)::

    for step in range(num_steps):
        params, opt_state = update(params, opt_state, batch)
        if step % 100 == 0:
            H = js.hessian_operator(loss, params, (X, y), batch_size=256)
            js.training.record("spectra", step, H, jax.random.key(step))
    records = js.training.load("spectra")

Each record holds the SLQ density (nodes and weights of every probe, and the mean
density on its grid), the top ``k`` Ritz values with their residuals, the trace estimated
from the same probes (``dim`` times each probe's quadrature mean), the gradient's share in
the top eigenspace (full-batch and per batch, for curvature operators) and the settings.
Nothing here changes the parameters or any training state.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np

from .validate import count, write_atomic

__all__ = ["load", "record"]

_NAME = re.compile(r"step_(\d+)\.json$")


def record(
    folder: str | os.PathLike,
    step: int,
    operator: Any,
    key: jax.Array,
    *,
    order: int = 60,
    num_probes: int = 5,
    top_k: int = 5,
    sigma_squared: float = 1e-5,
    grid_len: int = 1000,
    gradient_share: bool = True,
) -> dict:
    """Compute the spectrum of ``operator`` and write it as ``folder/step_<step>.json``.

    ``order`` and ``num_probes`` are SLQ's; ``top_k`` eigenpairs come from one Lanczos run
    of ``max(order, 3 top_k)`` steps; ``gradient_share`` needs a curvature operator (its
    ``gradient()``). Returns the record (the dict written). An existing file for ``step``
    is replaced atomically, so an interrupted write never leaves half a record.
    """
    from . import analysis
    from .eigen import eigenpairs
    from .slq import slq, spectral_density

    step = count("step", step, 0)
    top_k = count("top_k", top_k)
    if top_k > int(operator.dim):
        raise ValueError(f"top_k={top_k} is more than the operator's dimension {operator.dim}.")
    probe_key, pairs_key = jax.random.split(key)
    result = slq(operator, probe_key, order, num_probes=num_probes)
    density = spectral_density(result, sigma_squared=sigma_squared, grid_len=grid_len)
    nodes, weights = np.asarray(result.nodes), np.asarray(result.weights)
    pairs = eigenpairs(operator, pairs_key, top_k, order=max(order, 3 * top_k))
    traces = int(operator.dim) * np.sum(nodes * weights, axis=1)
    out = {
        "step": step,
        "dim": int(operator.dim),
        "settings": {
            "order": int(order),
            "num_probes": int(num_probes),
            "top_k": top_k,
            "sigma_squared": float(sigma_squared),
            "kind": getattr(operator, "kind", None),
        },
        "nodes": nodes.tolist(),
        "weights": weights.tolist(),
        "grid": np.asarray(density.grid).tolist(),
        "density": np.asarray(density.density).tolist(),
        "top_eigenvalues": np.asarray(pairs.values).tolist(),
        "top_residuals": np.asarray(pairs.residuals).tolist(),
        "trace": float(np.mean(traces)),
        "trace_stderr": float(np.std(traces, ddof=1) / np.sqrt(len(traces)))
        if len(traces) > 1
        else None,
    }
    if gradient_share and hasattr(operator, "gradient"):
        share = analysis.gradient_share(operator, pairs, per_batch=True)
        out["gradient_share"] = share.share.tolist()
        out["batch_gradient_share"] = share.batch_share.tolist()
        out["gradient_norm"] = share.gradient_norm
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_strict(out), allow_nan=False)  # NaN (a zero gradient's share): null
    write_atomic(folder / f"step_{step:09d}.json", lambda tmp: Path(tmp).write_text(text))
    return out


def _strict(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None`` (JSON has no NaN; ``load`` reads
    ``null`` in an array back as NaN)."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value


def load(folder: str | os.PathLike) -> list[dict]:
    """The records of ``folder`` (:func:`record`), sorted by step, arrays as NumPy."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of recorded spectra.")
    records = []
    for path in folder.iterdir():
        if _NAME.search(path.name):
            data = json.loads(path.read_text())
            for name in (
                "nodes",
                "weights",
                "grid",
                "density",
                "top_eigenvalues",
                "top_residuals",
                "gradient_share",
                "batch_gradient_share",
            ):
                if name in data:
                    data[name] = np.asarray(data[name], dtype=np.float64)
            records.append(data)
    if not records:
        raise FileNotFoundError(f"{folder} holds no step_<step>.json records.")
    return sorted(records, key=lambda r: r["step"])
