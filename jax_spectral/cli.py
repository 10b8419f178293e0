"""The ``jax-spectral`` command line (also ``python -m jax_spectral``).

``jax-spectral demo`` trains the digits MLP and analyses its Hessian; ``jax-spectral keras
MODEL.keras --data ...`` does the same analysis for a saved Keras model. Both print a cost
estimate first, show progress bars on long loops (``--quiet`` turns them off), and write
three files into ``--out``: ``spectrum.npz`` (grid, density, its standard error,
tridiagonals, nodes, weights, top eigenvalues), ``spectrum.json`` (eigenvalues, residuals,
outliers, trace, settings, versions, which stages finished) and ``density.png`` (when matplotlib is
installed). The density files are written as soon as SLQ finishes, so a failure later loses
nothing computed; the folder is created only once the inputs are valid, and an earlier
run's files in it are removed before the first new one is written.

Ctrl-C stops the stage in progress within about a step: the finished work is written
(an interrupted SLQ gives the density of the steps it finished, marked so in
spectrum.json's ``status``), one line goes to stderr, and the exit code is 130.

Exit codes: 0 done; 2 a bad argument or input file (one line on stderr); 1 a missing
optional dependency; 130 interrupted.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

from .validate import write_atomic


class InputError(Exception):
    """A bad argument or input file: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of the usage block
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(convert, accept, expected: str):
    """An argparse type: ``convert(text)``, refused with ``expected`` unless ``accept``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse


_positive_int = _number(int, lambda v: v > 0, "a positive integer")
_positive_float = _number(float, lambda v: 0 < v < math.inf, "a positive number")
_finite_float = _number(float, lambda v: math.isfinite(v) and v != 0, "a finite non-zero number")


def _key_pair(text: str) -> tuple[str, str]:
    parts = text.split(",")
    if len(parts) != 2 or not all(parts):
        raise argparse.ArgumentTypeError(f"expected two names as X,Y, got {text!r}")
    return parts[0], parts[1]


CURVATURES = {"hessian": "Hessian", "ggn": "Gauss-Newton", "fisher": "empirical Fisher"}


def _curvature_operator(curvature, loss, model_fn, out_loss, params, data, **options):
    """The operator the command analyses: ``loss(params, batch)``'s Hessian, or the GGN or
    empirical Fisher of ``out_loss(model_fn(params, x), y)``."""
    from . import fisher_operator, ggn_operator, hessian_operator

    if curvature == "hessian":
        return hessian_operator(loss, params, data, **options)
    if curvature == "ggn":
        return ggn_operator(model_fn, out_loss, params, data, **options)
    return fisher_operator(model_fn, out_loss, params, data, kind="empirical", **options)


def _analysis_options(parser: argparse.ArgumentParser, *, out: str, order: int, batch: int):
    parser.add_argument("--out", type=Path, default=Path(out), help=f"output folder ({out})")
    parser.add_argument(
        "--order", type=_positive_int, default=order, help=f"Lanczos steps ({order})"
    )
    parser.add_argument(
        "--num-probes", type=_positive_int, default=5, help="SLQ probes, in lockstep (5)"
    )
    parser.add_argument("--top", type=_positive_int, default=5, help="top eigenpairs (5)")
    parser.add_argument(
        "--trace-matvecs", type=_positive_int, default=99, help="Hutch++ products (99)"
    )
    parser.add_argument(
        "--sigma-squared",
        type=_positive_float,
        default=1e-5,
        help="kernel variance of the density, relative to the spectrum's width (1e-5)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument(
        "--batch-size", type=_positive_int, default=batch, help=f"HVP batch size ({batch})"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--compilation-cache",
        type=Path,
        metavar="DIR",
        help="keep compiled programs in DIR (JAX's persistent compilation cache), so that a "
        "rerun on the same model and settings skips most of its compile time",
    )
    parser.add_argument(
        "--data-parallel",
        action="store_true",
        help="split every batch over all devices (a one-axis mesh; with --distributed, "
        "over every process's devices)",
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="one process of a multi-host job: joins the others with "
        "jax.distributed.initialize() (the cluster's environment, e.g. Slurm, Open MPI, "
        "Kubernetes, Cloud TPU, or --coordinator/--num-processes/--process-id); each "
        "process analyses its equal share of the data, and process 0 writes the files",
    )
    parser.add_argument("--coordinator", metavar="HOST:PORT", help="with --distributed")
    parser.add_argument("--num-processes", type=_positive_int, help="with --distributed")
    parser.add_argument("--process-id", type=int, help="with --distributed")
    parser.add_argument(
        "--per-layer",
        action="store_true",
        help="also a density of each layer's block (the other weights fixed): layers.png",
    )
    parser.add_argument(
        "--curvature",
        choices=list(CURVATURES),
        default="hessian",
        help="the matrix: the loss's Hessian (default), the generalised Gauss-Newton "
        "J^T H_L J (H_L: the loss's Hessian in the model's outputs), or the empirical Fisher "
        "(per-sample gradients)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jax-spectral", description="Hessian eigenvalue densities of neural networks in JAX."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,keras}")
    demo = sub.add_parser(
        "demo",
        help="train a small MLP on the bundled digits data and compute its Hessian spectrum",
    )
    _analysis_options(demo, out="jax-spectral-demo", order=80, batch=512)
    demo.add_argument("--train-steps", type=_positive_int, default=300, help="Adam steps (300)")
    demo.add_argument(
        "--over-training",
        type=_positive_int,
        metavar="K",
        help="also record the spectrum through training, at step 0, every "
        "ceil(train-steps/K) steps and at the end (40 Lanczos steps, 3 probes, top 5), in "
        "OUT/training/, and draw OUT/training.png",
    )

    keras = sub.add_parser(
        "keras",
        help="the Hessian spectrum of a saved Keras model's loss on a dataset",
        description="The Hessian spectrum of a saved Keras model (.keras) at its saved "
        "weights, for its compiled loss (or --loss) on --data. Runs Keras on its JAX backend.",
    )
    keras.add_argument("model", help="a model saved with model.save('model.keras')")
    keras.add_argument(
        "--unsafe-load",
        action="store_true",
        help="run Python code stored in the model file (Lambda layers; Keras's "
        "safe_mode=False): only for a file you trust. Off by default",
    )
    keras.add_argument(
        "--data",
        default="digits",
        help="'digits' (scikit-learn's bundled 1,797 8x8 images as 64 features, pixel / 16, "
        "so in [0, 1]; labels 0-9; default), a .npz file with arrays x and y, or tfds:NAME "
        "(a tensorflow-datasets dataset prepared under --data-dir; never downloaded)",
    )
    keras.add_argument("--data-dir", help="tensorflow-datasets data_dir for tfds:NAME")
    keras.add_argument("--split", help="tfds split (train)")
    keras.add_argument(
        "--keys",
        type=_key_pair,
        help="names of inputs and targets: npz arrays (x,y) or "
        "tfds features (the dataset's supervised pair, else image,label)",
    )
    keras.add_argument("--limit", type=_positive_int, help="use only the first N samples")
    keras.add_argument(
        "--scale", type=_finite_float, default=1.0, help="multiply the inputs by this (1.0)"
    )
    keras.add_argument("--loss", help="a Keras loss name; default: the model's compiled loss")
    keras.add_argument("--from-logits", action="store_true", help="the named --loss takes logits")
    keras.add_argument("--reduce", choices=["mean", "sum"], default="mean")
    _analysis_options(keras, out="jax-spectral-keras", order=90, batch=128)
    return parser


# -- the analysis shared by both commands ------------------------------------------------


def _versions(**extra: str) -> dict:
    import jax

    from . import __version__

    return {
        "jax_spectral": __version__,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "backend": jax.default_backend(),
        **extra,
    }


def _lead() -> bool:
    """Whether this process writes the files and prints the report: process 0 of a
    multi-process job (``--distributed``), or the only process."""
    import jax

    return jax.process_index() == 0


def _save_npz(out: Path, **arrays: Any) -> None:
    import numpy as np

    if not _lead():
        return
    write_atomic(out / "spectrum.npz", lambda tmp: np.savez(tmp, **arrays))


def _save_json(out: Path, summary: dict) -> None:
    if not _lead():
        return
    write_atomic(out / "spectrum.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))


_OUTPUTS = ("spectrum.npz", "spectrum.json", "density.png", "layers.png")
_STAGES = ("density", "top_eigenvalues", "trace", "figure")


class Stopped(Exception):
    """Ctrl-C: what was finished is written; reported in one line, exit code 130."""


class TrainingStopped(Exception):
    """Ctrl-C while ``--over-training`` trains: the spectra recorded so far are kept (and
    drawn); reported in one line, exit code 130."""


def _say(text: str) -> None:
    """A line of the run's report, printed by process 0 only."""
    if _lead():
        print(text, flush=True)


def _adjust(summary: dict, note: str) -> None:
    """A setting the analysis had to change: printed, and recorded in spectrum.json."""
    _say(f"note: {note}")
    summary.setdefault("adjustments", []).append(note)


def _layer_densities(
    blocks, key, order, num_probes, sigma_squared, progress, out, arrays, summary
) -> dict:
    """An SLQ density of each block operator (at most ``order`` steps, its size), saved in
    spectrum.npz as ``layer{i}_grid``/``layer{i}_density`` and listed in spectrum.json."""
    import jax
    import numpy as np

    from . import slq, spectral_density

    layers, entries = {}, []
    for i, (name, block) in enumerate(blocks.items()):
        steps = min(order, block.dim)
        result = slq(
            block,
            jax.random.fold_in(key, i + 1),
            num_probes=num_probes,
            order=steps,
            progress=progress,
        )
        layers[name] = spectral_density(result, sigma_squared=sigma_squared)
        arrays.update(
            {f"layer{i}_grid": layers[name].grid, f"layer{i}_density": layers[name].density}
        )
        nodes = np.asarray(result.nodes)[np.asarray(result.weights) > 0]
        entries.append(
            {
                "name": name,
                "num_params": int(block.dim),
                "order": steps,
                "extreme_nodes": [float(nodes.min()), float(nodes.max())],
            }
        )
    summary["layers"] = entries
    _save_npz(out, **arrays)
    _save_json(out, summary)
    return layers


def _draw_layers(out: Path, layers: dict, title: str, note: str) -> str:
    from .plot import plot_densities

    if not _lead():
        return "drawn by process 0"
    try:
        fig = plot_densities(
            layers, path=out / "layers.png", title=title + ", per layer", note=note
        )
    except ImportError:
        return "not drawn (pip install 'jax-spectral[plot]' for layers.png)"
    import matplotlib.pyplot as plt

    fig.clf()
    plt.close(fig)
    return str(out / "layers.png")


def _draw(out: Path, dens: Any, outliers: Any, title: str, note: str) -> str:
    from .plot import plot_density  # imports matplotlib only when called

    if not _lead():
        return "drawn by process 0"
    try:
        fig = plot_density(
            dens, outliers=outliers, path=out / "density.png", title=title, note=note
        )
    except ImportError:  # matplotlib is missing: the npz and json still hold everything
        return "not drawn (pip install 'jax-spectral[plot]' for density.png)"
    import matplotlib.pyplot as plt

    fig.clf()  # written; free it (pyplot keeps figures alive otherwise)
    plt.close(fig)
    return str(out / "density.png")


def analyse(
    operator: Any,
    *,
    out: Path,
    key: Any,
    order: int,
    num_probes: int,
    top: int,
    trace_matvecs: int,
    sigma_squared: float,
    progress: bool,
    title: str,
    summary: dict,
    started: float,
    blocks: dict | None = None,
) -> dict:
    """SLQ density, top eigenpairs and Hutch++ trace of ``operator``; writes the files.
    ``blocks`` (``{name: operator}``, one per layer): a density of each, after the trace.

    ``spectrum.json``'s ``status`` says which stages finished (``done``, ``interrupted
    after k of n steps``, ``not run``) and ``complete`` whether all did; the files of an
    earlier run in ``out`` are removed first, so the set on disk is always one run's.
    """
    import jax

    blocks = blocks or {}
    plan = _plan(operator, order, num_probes, top, trace_matvecs, blocks, summary)
    if _lead():  # (on several processes, process 0 writes the files)
        _prepare_out(out)
        for name in _OUTPUTS:  # an earlier run's files go before any of this run's is written
            (out / name).unlink(missing_ok=True)
    _record_settings(summary, plan, num_probes, sigma_squared, top)
    run = _Run(out, summary, started, _STAGES + (("layers",) if blocks else ()))
    keys = jax.random.split(key, 3)
    with run:
        dens, note = run.density(
            operator, keys[0], plan, num_probes, sigma_squared, progress, title
        )
        pairs = run.top_eigenvalues(operator, keys[1], top, plan.eig_order, progress)
        trace = run.trace(operator, keys[2], plan.trace_matvecs, progress)
        if blocks:
            run.layers(blocks, keys[2], plan, num_probes, sigma_squared, progress, title, note)
        run.stage = "figure"
        figure = _draw(out, dens, pairs.values, title, note + f"; top {top} eigenvalues dashed")
        run.status["figure"] = "done" if figure.endswith(".png") else figure
    run.finish()
    if _lead():
        _report(summary, num_probes, plan, pairs, trace, out, figure)
    return summary


class _Plan(NamedTuple):
    order: int  # SLQ steps
    eig_order: int  # Lanczos steps for the top eigenpairs
    trace_matvecs: int


def _plan(operator, order, num_probes, top, trace_matvecs, blocks, summary) -> _Plan:
    """The settings the run can use (each change noted in ``summary``) and its cost,
    printed before any work."""
    from . import estimate

    dim = operator.dim
    if top > dim:
        raise InputError(f"--top {top} exceeds the model's {dim} parameters.")
    if order > dim:
        _adjust(summary, f"--order {order} exceeds the {dim} parameters: using {dim} steps")
        order = dim
    eig_order = min(dim, max(4 * top, 80))
    if eig_order != order:
        _adjust(
            summary,
            f"the top {top} eigenpairs use {eig_order} Lanczos steps, not "
            f"--order {order} (max(4 x --top, 80), at most the parameter count)",
        )
    if trace_matvecs < 6:
        _adjust(summary, f"--trace-matvecs {trace_matvecs} is below Hutch++'s minimum: using 6")
        trace_matvecs = 6
    chunk = 10
    third = trace_matvecs // 3  # Hutch++: sketch, its exact trace, then deflated probes
    trace_passes = 2 * -(-third // chunk) + -(-(trace_matvecs - 2 * third) // chunk)
    passes = order + eig_order + -(-top // chunk) + trace_passes
    passes += sum(min(order, block.dim) for block in blocks.values())
    basis_bytes = max(
        estimate(operator, order=order, num_probes=num_probes).basis_bytes,
        estimate(operator, order=eig_order).basis_bytes,
    )
    _say(
        f"cost: about {passes} passes over {operator.num_samples or 'the'} samples "
        f"({order} SLQ steps serving all {num_probes} probes at once, {eig_order} Lanczos steps "
        f"for the top {top}, {trace_matvecs} trace products in chunks of {chunk}); "
        f"Lanczos bases up to {basis_bytes / 2**20:.1f} MiB"
    )
    return _Plan(order, eig_order, trace_matvecs)


def _record_settings(summary: dict, plan: _Plan, num_probes, sigma_squared, top) -> None:
    """The settings the run uses (after :func:`_plan`'s changes), recorded in
    spectrum.json's ``settings`` so that the run can be repeated."""
    summary.setdefault("settings", {}).update(
        order=plan.order,
        num_probes=num_probes,
        sigma_squared=sigma_squared,
        top=top,
        eig_order=plan.eig_order,
        trace_matvecs=plan.trace_matvecs,
    )


class _Run:
    """The stages of one analysis and what they leave in ``out``: ``status`` (in
    ``summary``) says which stage finished, ``arrays`` is what ``spectrum.npz`` holds.
    Used as a context manager: a failure or Ctrl-C marks the stage in progress and writes
    the summary before it propagates."""

    def __init__(self, out: Path, summary: dict, started: float, stages: tuple):
        self.out, self.summary, self.started = out, summary, started
        self.status = summary["status"] = {"complete": False, **dict.fromkeys(stages, "not run")}
        self.stage, self.arrays = stages[0], {}

    def save(self) -> None:
        _save_json(self.out, self.summary)

    def density(self, operator, key, plan, num_probes, sigma_squared, progress, title):
        """SLQ and its density (kept when Ctrl-C ends SLQ early), saved and drawn."""
        import numpy as np

        from . import Interrupted, outliers, slq, spectral_density

        self.stage = "density"
        try:
            result = slq(operator, key, num_probes=num_probes, order=plan.order, progress=progress)
            self.status["density"] = "done"
        except Interrupted as stop:
            if stop.result is None:
                raise
            result = stop.result
            self.status["density"] = f"interrupted after {stop.steps} of {plan.order} steps"
        dens = spectral_density(result, sigma_squared=sigma_squared)
        self.arrays.update(
            grid=dens.grid,
            density=dens.density,
            stderr=dens.stderr,
            tridiags=np.asarray(result.lanczos.padded_tridiag()),
            nodes=result.nodes,
            weights=result.weights,
        )
        _save_npz(self.out, **self.arrays)
        self.summary["slq_steps"] = np.asarray(result.lanczos.num_steps).tolist()
        # an outlier is a Ritz value that the probes agree on: only from a finished run
        if num_probes >= 2 and self.status["density"] == "done":
            try:
                found = outliers(result)
                self.summary["outliers"] = {
                    "upper": found.upper.tolist(),
                    "lower": found.lower.tolist(),
                    "bulk": list(found.bulk),
                }
            except ValueError as err:  # e.g. one distinct node (--order 1)
                self.summary["outliers"] = {"not sought": _one_line(err)}
        self.save()
        self.stage = "figure"
        steps = int(np.max(result.lanczos.num_steps))
        note = (
            f"sigma^2 = {sigma_squared:g} (relative), {num_probes} probes x {steps} "
            f"Lanczos steps, {operator.num_samples or 'all'} samples"
        )
        figure = _draw(self.out, dens, None, title, note)
        self.status["figure"] = "density only" if figure.endswith(".png") else figure
        self.save()
        if self.status["density"] != "done":
            raise Stopped(f"SLQ {self.status['density']}")
        return dens, note

    def top_eigenvalues(self, operator, key, top, eig_order, progress):
        from . import eigenpairs

        self.stage = "top_eigenvalues"
        try:
            pairs = eigenpairs(
                operator, key, top, which="largest", order=eig_order, progress=progress
            )
        except ValueError as err:  # fewer distinct eigenvalues than --top (density saved)
            raise InputError(f"--top {top}: {err}") from None
        self.status["top_eigenvalues"] = "done"
        self.summary.update(
            top_eigenvalues=pairs.values.tolist(),
            residuals=pairs.residuals.tolist(),
            converged=pairs.converged.tolist(),
        )
        self.arrays.update(top_eigenvalues=pairs.values, residuals=pairs.residuals)
        _save_npz(self.out, **self.arrays)
        self.save()
        return pairs

    def trace(self, operator, key, trace_matvecs, progress):
        from . import hutchpp

        self.stage = "trace"
        trace = hutchpp(operator, key, num_matvecs=trace_matvecs, progress=progress)
        self.status["trace"] = "done"
        self.summary.update(trace=trace.estimate, trace_stderr=trace.stderr)
        return trace

    def layers(self, blocks, key, plan, num_probes, sigma_squared, progress, title, note):
        """A density of each layer's block (after the trace), saved and drawn (layers.png)."""
        self.stage = "layers"
        self.save()
        layers = _layer_densities(
            blocks,
            key,
            plan.order,
            num_probes,
            sigma_squared,
            progress,
            self.out,
            self.arrays,
            self.summary,
        )
        self.status["layers"] = "done"
        drawn = _draw_layers(self.out, layers, title, note)
        if not drawn.endswith(".png"):
            self.status["layers"] = f"done; figure {drawn}"

    def __enter__(self) -> _Run:
        return self

    def __exit__(self, kind, err, traceback) -> None:
        if err is None:
            return
        if isinstance(err, KeyboardInterrupt):  # Interrupted included
            if self.status[self.stage] in ("not run", "density only"):
                self.status[self.stage] = "interrupted"
            self._stamp()
            what = str(err).split(";")[0] if str(err) else None
            raise Stopped(what or f"{self.stage.replace('_', ' ')} interrupted") from None
        if isinstance(err, (Stopped, InputError, FloatingPointError)):
            if not isinstance(err, Stopped) and self.status[self.stage] == "not run":
                self.status[self.stage] = f"failed: {_one_line(err)}"
            self._stamp()

    def _stamp(self) -> None:
        self.summary["seconds"] = round(time.perf_counter() - self.started, 2)
        self.save()

    def finish(self) -> None:
        self.status["complete"] = True
        self._stamp()


def _report(summary, num_probes, plan, pairs, trace, out, figure) -> None:
    matrix = CURVATURES[summary.get("settings", {}).get("curvature", "hessian")]
    print(f"SLQ: {num_probes} probes x {plan.order} Lanczos steps on the dataset {matrix}")
    print("top eigenvalues: " + ", ".join(f"{v:.5g}" for v in pairs.values))
    found = summary.get("outliers")
    if found is not None and "bulk" not in found:
        print(f"outliers: not sought ({found['not sought']})")
    elif found is not None:
        low, high = found["bulk"]
        print(
            f"outliers: {len(found['upper'])} above the bulk [{low:.4g}, {high:.4g}], "
            f"{len(found['lower'])} below it (js.outliers, a gap rule)"
        )
    if not all(pairs.converged):
        print(f"  (not all converged: residuals {', '.join(f'{r:.2g}' for r in pairs.residuals)})")
    print(
        f"trace: {trace.estimate:.5g} +- {trace.stderr:.2g} (Hutch++, "
        f"{plan.trace_matvecs} products)"
    )
    print(f"density written to {out / 'spectrum.npz'}; figure: {figure}")
    print(f"summary written to {out / 'spectrum.json'} ({summary['seconds']} s)")


# -- the commands -------------------------------------------------------------------------


def _join(args: argparse.Namespace) -> None:
    """``--distributed``: join the other processes of the job (``jax.distributed``; CPU
    devices talk through gloo)."""
    manual = {"--coordinator": args.coordinator, "--num-processes": args.num_processes}
    manual["--process-id"] = args.process_id
    given = [name for name, value in manual.items() if value is not None]
    if given and not args.distributed:
        raise InputError(f"{', '.join(given)} go(es) with --distributed.")
    if not args.distributed:
        return
    import jax

    address = args.coordinator
    if address is not None and not re.fullmatch(r"\S+:\d{1,5}", address):
        raise InputError(f"--coordinator {address!r} is not HOST:PORT.")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(address, args.num_processes, args.process_id)
    except Exception as err:  # noqa: BLE001 - JAX's own errors: one line, exit code 2
        raise InputError(f"--distributed: {_one_line(err)}") from None


def _data_mesh(args: argparse.Namespace) -> Any:
    """``--data-parallel`` or ``--distributed``: a one-axis ``"data"`` mesh over every
    device (of every process)."""
    if not (args.data_parallel or args.distributed):
        return None
    import jax

    auto = (jax.sharding.AxisType.Auto,)
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=auto)


def _parallel_settings(mesh: Any) -> dict:
    """What spectrum.json records of the devices: how many split each batch, and the
    processes."""
    import jax

    return {"devices": 1 if mesh is None else int(mesh.size), "processes": jax.process_count()}


def _mesh_options(mesh: Any) -> dict:
    return {} if mesh is None else {"mesh": mesh, "data_axis": "data"}


def _share(data: tuple, notes: dict) -> tuple:
    """This process's equal share of in-memory arrays on several processes (the whole of
    them on one); the ``N mod P`` samples left over are not used, and a note says so."""
    import jax

    processes, index = jax.process_count(), jax.process_index()
    if processes == 1:
        return data
    n = len(data[0])
    each = n // processes
    if each == 0:
        raise InputError(f"{n} samples cannot be shared by {processes} processes.")
    if n % processes:
        _adjust(
            notes,
            f"{n} samples shared by {processes} processes: {each} each; the last "
            f"{n % processes} are not used",
        )
    return tuple(a[index * each : (index + 1) * each] for a in data)


def run_demo(
    out: Path,
    *,
    order: int,
    seed: int,
    batch_size: int,
    train_steps: int,
    num_probes: int = 5,
    top: int = 5,
    trace_matvecs: int = 99,
    sigma_squared: float = 1e-5,
    progress: bool = False,
    curvature: str = "hessian",
    per_layer: bool = False,
    mesh: Any = None,
    over_training: int | None = None,
) -> dict:
    """Train the digits MLP, then the density (SLQ), top eigenpairs and trace of its
    Hessian (or ``curvature``: ``"ggn"``, ``"fisher"``); ``mesh``: every batch split over
    its ``"data"`` axis (on several processes, each takes its share of the digits).
    ``over_training``: also the Hessian's spectrum through training, at step 0, every
    ``ceil(train_steps / K)`` steps and at the end (:mod:`jax_spectral.training`), in
    ``out/training/`` and ``out/training.png``."""
    started = time.perf_counter()
    record = None
    if over_training is not None:
        if mesh is not None:
            raise InputError("--over-training runs on one device (no --data-parallel).")
        record = _over_training(out, seed, batch_size, train_steps, over_training, progress)
    elif _lead():  # an earlier run's records would sit beside this run's files
        _remove_training_outputs(out)
    trained, key = _train_digits_mlp(seed, train_steps, record)
    notes: dict = {}
    if record is not None:
        notes["over_training"] = record.finish()
    data = _share((trained.X, trained.y), notes)
    operator, blocks = _demo_operators(trained, data, curvature, batch_size, per_layer, mesh)
    settings = {
        "seed": seed,
        "batch_size": batch_size,
        "train_steps": train_steps,
        "reduce": "mean",
        "loop": operator.loop,
        "curvature": curvature,
        **_parallel_settings(mesh),
    }
    return analyse(
        operator,
        out=out,
        key=key,
        order=order,
        num_probes=num_probes,
        top=top,
        trace_matvecs=trace_matvecs,
        sigma_squared=sigma_squared,
        progress=progress,
        title=f"{CURVATURES[curvature]} density, digits MLP ({num_probes} probes)",
        summary={**_demo_summary(trained, operator, settings), **notes},
        blocks=blocks,
        started=started,
    )


class _Trained(NamedTuple):
    """The demo's trained MLP, its data and how well it fits them."""

    model: Any
    params: Any
    loss: Any
    X: Any
    y: Any
    accuracy: float
    num_params: int


class _Recorder:
    """``callback(step, params)`` for the trainer: the Hessian's spectrum at ``params``
    written to ``out/training/``; ``finish()`` draws ``out/training.png``."""

    def __init__(self, out, seed, batch_size, every, progress):
        self.out, self.seed, self.batch_size, self.every = out, seed, batch_size, every
        self.progress, self.loss, self.data = progress, None, None
        self.recorded = 0  # records written by this run

    def __call__(self, step, params):
        import jax

        from . import hessian_operator, training

        if step == 0:  # an earlier run's records would mix with this run's
            _prepare_out(self.out)
            _remove_training_outputs(self.out)
        H = hessian_operator(self.loss, params, self.data, batch_size=self.batch_size)
        key = jax.random.fold_in(jax.random.key(self.seed + 1), step)
        record = training.record(self.out / "training", step, H, key, order=40, num_probes=3)
        self.recorded += 1
        if self.progress:
            _say(f"  step {step}: top eigenvalue {record['top_eigenvalues'][0]:.4g}")

    def finish(self) -> dict:
        from . import training

        records = training.load(self.out / "training")
        note = {"records": len(records), "every": self.every, "folder": "training/"}
        try:
            from .plot import plot_training

            plot_training(
                records,
                title="Hessian spectrum through training, digits MLP",
                path=self.out / "training.png",
            )
            note["figure"] = "training.png"
        except ImportError:
            note["figure"] = "not drawn (pip install 'jax-spectral[plot]')"
        return note


def _remove_training_outputs(out: Path) -> None:
    """``--over-training``'s files of an earlier run in ``out``, if any."""
    (out / "training.png").unlink(missing_ok=True)
    for old in (out / "training").glob("step_*.json"):
        old.unlink()


def _over_training(out, seed, batch_size, train_steps, times, progress) -> _Recorder:
    every = -(-train_steps // times)  # ceil: at most `times` pieces after step 0
    return _Recorder(out, seed, batch_size, every, progress)


def _train_digits_mlp(seed: int, train_steps: int, record=None) -> tuple[_Trained, Any]:
    """Train the MLP on the bundled digits, print its loss and accuracy, and return it
    with the key left over for the analysis."""
    import jax
    import numpy as np
    from jax.flatten_util import ravel_pytree

    from . import datasets

    X, y = datasets.load_digits()
    model = datasets.mlp()
    key_init, key = jax.random.split(jax.random.key(seed))
    params = model.init(key_init, X[:1])["params"]
    loss = datasets.cross_entropy_loss(model.apply)
    if record is not None:  # the spectrum through training (--over-training)
        record.loss, record.data = loss, (X, y)
    try:
        params = datasets.train_classifier(
            loss,
            params,
            (X, y),
            steps=train_steps,
            every=None if record is None else record.every,
            callback=record,
        )
    except KeyboardInterrupt:
        if record is None or not record.recorded:
            raise
        try:  # keep what was recorded: the figure of the spectra so far
            figure = record.finish().get("figure")
        except Exception as err:  # noqa: BLE001 - the records stay; the figure is extra
            figure = f"not drawn ({_one_line(err)})"
        raise TrainingStopped(
            f"during training, after {record.recorded} recorded spectra: they are in "
            f"{record.out / 'training'} (figure: {figure})"
        ) from None
    if jax.process_count() > 1:  # every process analyses process 0's weights
        from jax.experimental import multihost_utils

        params = multihost_utils.broadcast_one_to_all(params)
    logits = model.apply({"params": params}, X)
    accuracy = float(np.mean(np.argmax(logits, axis=1) == y))
    num_params = ravel_pytree(params)[0].size
    _say(
        f"trained a {num_params}-parameter MLP on digits ({len(X)} samples): "
        f"loss {float(loss(params, (X, y))):.4f}, accuracy {accuracy:.3f}"
    )
    return _Trained(model, params, loss, X, y, accuracy, num_params), key


def _demo_operators(trained: _Trained, data, curvature, batch_size, per_layer, mesh):
    """The ``curvature`` operator of the trained MLP on the digits ``data`` and, with
    ``per_layer``, one per layer."""
    from . import layer_blocks

    build = functools.partial(
        _curvature_operator,
        curvature,
        trained.loss,
        functools.partial(_flax_apply, trained.model.apply),
        "softmax_cross_entropy",
        trained.params,
        data,
        batch_size=batch_size,
        **_mesh_options(mesh),
    )
    try:
        operator = build()
        blocks = {}
        if per_layer:
            blocks = {name: build(wrt=w) for name, w in layer_blocks(trained.params).items()}
    except ValueError as err:  # e.g. a batch size the devices do not divide
        raise InputError(_one_line(err)) from None
    return operator, blocks


def _demo_summary(trained: _Trained, operator: Any, settings: dict) -> dict:
    """The start of the demo's ``spectrum.json``: the model, its data and the settings."""
    return {
        "model": "digits MLP 64-32-10 (tanh)",
        "num_params": int(trained.num_params),
        "num_samples": int(operator.num_samples),
        "train_accuracy": trained.accuracy,
        "settings": settings,
        "versions": _versions(),
    }


def _flax_apply(apply, params, x):
    """A Flax ``apply`` as ``model(params, x)`` (partially applied: hashable)."""
    return apply({"params": params}, x)


def _use_jax_backend() -> None:
    """Keras must run on JAX here; refuse a Keras already imported with another backend."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    if "keras" in sys.modules:
        backend = sys.modules["keras"].backend.backend()
        if backend != "jax":
            raise InputError(f"Keras is already running on {backend!r}; this needs 'jax'.")
        return
    current = os.environ.get("KERAS_BACKEND", "jax")
    if current != "jax":
        print(f"note: running Keras on JAX (KERAS_BACKEND was {current!r})", file=sys.stderr)
    os.environ["KERAS_BACKEND"] = "jax"


def _keras_inputs(args: argparse.Namespace) -> tuple:
    """``(model, x, y, given_shape, loss_fn, out_loss)`` from the command's arguments;
    one-line errors for what does not fit."""
    from keras_bridge import loading

    from . import datasets

    tfds = args.data.startswith("tfds:")
    for option, value, allowed in (
        ("--split", args.split, tfds),
        ("--data-dir", args.data_dir, tfds),
        ("--keys", args.keys, args.data != "digits"),
    ):
        if value is not None and not allowed:
            raise InputError(f"{option} does not apply to --data {args.data}.")
    if args.from_logits and args.loss is None:
        raise InputError("--from-logits applies to a loss named with --loss.")
    try:
        model = loading.load_model(args.model, safe_mode=not args.unsafe_load)
        x, y = datasets.load_arrays(
            args.data,
            data_dir=args.data_dir,
            split=args.split or "train",
            keys=args.keys,
            limit=args.limit,
        )
        given = x.shape[1:]
        x = loading.shape_inputs(model, x) * args.scale
        compiled = getattr(model, "loss", None)
        loss_name = args.loss or getattr(compiled, "name", compiled)
        loading.check_targets(model, y, loss_name if isinstance(loss_name, str) else None)
        loss_fn = loading.loss_closure(model, args.loss, from_logits=args.from_logits)
        out_loss = None
        if args.curvature != "hessian":
            out_loss = loading.output_loss(model, args.loss, from_logits=args.from_logits)
    except (OSError, ValueError) as err:
        raise InputError(str(err)) from None
    return model, x, y, given, loss_fn, out_loss


def _keras_operators(args, model, loss, params, out_loss, data) -> tuple:
    """The curvature operator of ``--curvature`` and, with ``--per-layer``, one per layer."""
    from keras_bridge import layer_blocks, pure_model

    try:
        build = functools.partial(
            _curvature_operator,
            args.curvature,
            loss,
            pure_model(model) if out_loss else None,
            out_loss,
            params,
            data,
            batch_size=args.batch_size,
            reduce=args.reduce,
            **_mesh_options(_data_mesh(args)),
        )
        operator = build()
        blocks = {}
        if args.per_layer:
            blocks = {name: build(wrt=w) for name, w in layer_blocks(model).items()}
    except (ValueError, TypeError) as err:
        text = str(err).strip()
        text = text.splitlines()[0].rstrip(".") if text else type(err).__name__
        raise InputError(f"the model and loss cannot be applied to the data: {text}") from None
    return operator, blocks


def run_keras(args: argparse.Namespace) -> dict:
    """``jax-spectral keras``: load the model and data, then :func:`analyse`."""
    started = time.perf_counter()
    _use_jax_backend()
    import jax
    import keras

    from keras_bridge import pure_loss, trainable_values

    model, x, y, given, loss_fn, out_loss = _keras_inputs(args)
    loss = pure_loss(model, loss_fn)
    params = trainable_values(model)
    shared: dict = {}
    mine = _share((x, y), shared)
    operator, blocks = _keras_operators(args, model, loss, params, out_loss, mine)
    name = Path(args.model).name
    notes = _announce_keras_data(args, name, operator, x, given)
    quality = _fit_on(model, loss, params, x, y, args.batch_size)
    _say(  # so that a user sees whether the preprocessing matches the training's
        "on this data the model has loss "
        + ", accuracy ".join(f"{v:.4g}" for v in quality.values())
        + " (a loss far above the training loss means other preprocessing: see --scale)"
    )
    summary = _keras_summary(
        args, operator, operator.num_samples, keras.__version__, {**quality, **notes, **shared}
    )
    return analyse(
        operator,
        out=args.out,
        key=jax.random.key(args.seed),
        order=args.order,
        num_probes=args.num_probes,
        top=args.top,
        trace_matvecs=args.trace_matvecs,
        sigma_squared=args.sigma_squared,
        progress=not args.quiet,
        title=f"{CURVATURES[args.curvature]} density, {name} ({args.num_probes} probes)",
        summary=summary,
        blocks=blocks,
        started=started,
    )


def _announce_keras_data(args, name: str, operator, x, given) -> dict:
    """Print what was loaded, before any long work; returns the notes for spectrum.json
    (a reshape of the data's samples to the model's input shape, also printed)."""
    notes: dict = {}
    if x.shape[1:] != given:
        _adjust(
            notes,
            f"the data's samples of shape {given} are reshaped to the model's "
            f"input shape {x.shape[1:]}",
        )
    _say(
        f"loaded {name}: {operator.dim:,} trainable parameters; data {args.data}: "
        f"{len(x)} samples of shape {x.shape[1:]}, batches of {args.batch_size} "
        f"({operator.loop} loop)"
    )
    return notes


def _keras_summary(args, operator, num_samples: int, keras_version: str, extra: dict) -> dict:
    """The start of the Keras command's ``spectrum.json``: the model, its data, the
    settings (so that the run can be repeated), then ``extra`` (the fit, the notes)."""
    return {
        "model": str(args.model),
        "num_params": int(operator.dim),
        "num_samples": num_samples,
        "data": args.data,
        "settings": {
            "seed": args.seed,
            "batch_size": args.batch_size,
            "reduce": args.reduce,
            "loss": args.loss or "compiled",
            "from_logits": args.from_logits,
            "split": args.split,
            "limit": args.limit,
            "scale": args.scale,
            "loop": operator.loop,
            "curvature": args.curvature,
            **_parallel_settings(_data_mesh(args)),
        },
        "versions": _versions(keras=keras_version),
        **extra,
    }


def _fit_on(model: Any, loss: Any, params: Any, x: Any, y: Any, batch_size: int) -> dict:
    """The mean loss (the one analysed) over the data and, for a classifier (integer or
    one-hot labels, one output column per class), its accuracy."""
    import jax
    import numpy as np

    value = jax.jit(loss)
    total, correct, n = 0.0, 0, len(x)
    classify = np.issubdtype(np.asarray(y).dtype, np.number)
    for i in range(0, n, batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        total += float(value(params, (xb, yb))) * len(xb)
        if not classify:
            continue
        # (not model.predict, whose compiled step donates the weights' buffers: they are
        # the params' too)
        out = np.asarray(model(xb, training=False))
        labels = np.asarray(yb)
        if labels.ndim == 2 and labels.shape == out.shape:  # one-hot
            labels = labels.argmax(axis=1)
        classify = out.ndim == 2 and out.shape[1] > 1 and labels.shape == out.shape[:1]
        correct += int(np.sum(out.argmax(axis=-1) == labels)) if classify else 0
    quality = {"loss": total / n}
    if classify:
        quality["accuracy"] = correct / n
    return quality


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` that cannot become a folder, without creating anything."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} exists and is not a folder.")
    ancestor = out.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(
            f"--out {str(out)!r} cannot be written: {ancestor} is not a writable folder."
        )


def _prepare_out(out: Path) -> None:
    """Create the output folder (once the inputs are valid) and check that it is writable."""
    _check_out(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".jax-spectral-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise InputError(f"--out {str(out)!r} cannot be written: {err.strerror or err}.") from None


def use_compilation_cache(folder: Path) -> None:
    """Turn on JAX's persistent compilation cache in ``folder`` for every program that
    takes at least a tenth of a second to compile (the oneDNN kernels' targets have fixed
    names, so their programs are reused across processes too)."""
    import jax

    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"--compilation-cache {folder}: {err.strerror}") from None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        _join(args)
        if args.compilation_cache is not None:
            use_compilation_cache(args.compilation_cache)
        if _lead():
            _check_out(args.out)
        if args.command == "demo":
            run_demo(
                args.out,
                order=args.order,
                seed=args.seed,
                batch_size=args.batch_size,
                train_steps=args.train_steps,
                num_probes=args.num_probes,
                top=args.top,
                trace_matvecs=args.trace_matvecs,
                sigma_squared=args.sigma_squared,
                progress=not args.quiet,
                curvature=args.curvature,
                per_layer=args.per_layer,
                mesh=_data_mesh(args),
                over_training=args.over_training,
            )
        else:
            run_keras(args)
    except (InputError, FloatingPointError) as err:
        # FloatingPointError: a NaN or Inf product, from the data, the model or the loss.
        print(f"jax-spectral {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except TrainingStopped as stop:
        print(f"jax-spectral {args.command}: interrupted {stop}", file=sys.stderr)
        return 130
    except Stopped as stop:
        print(
            f"jax-spectral {args.command}: interrupted ({stop}); the finished stages are in "
            f"{args.out} (spectrum.json's status says which)",
            file=sys.stderr,
        )
        return 130
    except KeyboardInterrupt:  # before the analysis began: nothing was written
        print(f"jax-spectral {args.command}: interrupted before any result", file=sys.stderr)
        return 130
    except ImportError as err:
        print(f"jax-spectral: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
