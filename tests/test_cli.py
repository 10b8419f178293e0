"""``jax-spectral keras``: a saved Keras model on digits, .npz and a local tfds dataset,
checked against a dense Hessian; and one-line errors with exit code 2."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jax_spectral import datasets
from jax_spectral.cli import main

pytestmark = pytest.mark.slow  # Keras models through the command line (TensorFlow)

keras = pytest.importorskip("keras")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A 610-parameter softmax MLP trained briefly on digits with model.fit, saved."""
    x, y = datasets.load_digits()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=2, batch_size=64, verbose=0)
    path = tmp_path_factory.mktemp("model") / "mlp.keras"
    model.save(path)
    return path


def _dense_reference(path):
    """Eigenvalues and trace of the mean cross-entropy Hessian over all of digits, from
    jax.hessian (forward-over-reverse Jacobian of the gradient, no HVP loop, no Lanczos)."""
    model = keras.saving.load_model(path)
    x, y = datasets.load_digits()
    weights = [jnp.asarray(v.value) for v in model.trainable_variables]
    flat, unravel = ravel_pytree(weights)

    def loss(f):
        w1, b1, w2, b2 = unravel(f)
        p = jax.nn.softmax(jnp.tanh(x @ w1 + b1) @ w2 + b2)
        return -jnp.mean(jnp.log(p[jnp.arange(len(y)), y]))

    h = np.asarray(jax.hessian(loss)(flat), np.float64)
    return np.linalg.eigvalsh((h + h.T) / 2)[::-1], float(np.trace(h))


def _loss_and_accuracy(path):
    """The mean cross-entropy and accuracy on digits, from the weights with NumPy."""
    model = keras.saving.load_model(path)
    x, y = datasets.load_digits()
    w1, b1, w2, b2 = (np.asarray(v.value, np.float64) for v in model.trainable_variables)
    logits = np.tanh(x @ w1 + b1) @ w2 + b2
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    return -logp[np.arange(len(y)), y].mean(), np.mean(logits.argmax(1) == y)


def _run(saved_model, out, *extra):
    argv = [
        "keras",
        str(saved_model),
        "--out",
        str(out),
        "--order",
        "40",
        "--num-probes",
        "2",
        "--top",
        "3",
        "--trace-matvecs",
        "60",
        "--quiet",
        *extra,
    ]
    assert main(argv) == 0
    return json.loads((out / "spectrum.json").read_text()), np.load(out / "spectrum.npz")


def test_keras_command_on_digits_matches_the_dense_hessian(saved_model, tmp_path, capsys):
    summary, saved = _run(saved_model, tmp_path)
    printed = capsys.readouterr().out
    assert "610 trainable parameters" in printed and "cost: about" in printed
    eigenvalues, trace = _dense_reference(saved_model)
    np.testing.assert_allclose(summary["top_eigenvalues"], eigenvalues[:3], rtol=1e-4)
    assert all(summary["converged"]) and summary["num_params"] == 610
    # the gap rule's outliers (7 above, 1 below here) are the dense extreme eigenvalues
    upper, lower = summary["outliers"]["upper"], summary["outliers"]["lower"]
    assert upper and eigenvalues[0] > eigenvalues[-1]
    np.testing.assert_allclose(upper, eigenvalues[: len(upper)], rtol=1e-4)
    np.testing.assert_allclose(lower, eigenvalues[::-1][: len(lower)], rtol=1e-4)
    assert summary["outliers"]["bulk"][1] <= eigenvalues[len(upper)] * (1 + 1e-4)
    assert "outliers:" in printed
    assert abs(summary["trace"] - trace) <= 3 * summary["trace_stderr"] + 1e-6 * abs(trace)
    assert saved["tridiags"].shape == (2, 40, 40)
    assert np.sum(saved["density"]) * (saved["grid"][1] - saved["grid"][0]) == pytest.approx(1.0)
    assert (tmp_path / "density.png").read_bytes().startswith(b"\x89PNG")
    assert summary["versions"]["keras"] == keras.__version__
    loss, accuracy = _loss_and_accuracy(saved_model)  # printed, so preprocessing shows
    assert summary["loss"] == pytest.approx(loss, rel=1e-5)
    assert summary["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert f"on this data the model has loss {loss:.4g}, accuracy {accuracy:.4g}" in printed


def test_npz_and_local_tfds_data_give_the_same_spectrum(saved_model, tmp_path):
    pytest.importorskip("tensorflow_datasets")
    reference, _ = _run(saved_model, tmp_path / "digits")
    x, y = datasets.load_digits()
    images = np.rint(x * 16).astype(np.uint8).reshape(-1, 8, 8, 1)  # the raw 0..16 pixels
    np.savez(tmp_path / "digits.npz", inputs=images, labels=y)
    from_npz, _ = _run(
        saved_model,
        tmp_path / "npz",
        "--data",
        str(tmp_path / "digits.npz"),
        "--keys",
        "inputs,labels",
        "--scale",
        "0.0625",
    )

    # The same images as a tensorflow-datasets dataset prepared locally: no download.
    datasets.prepare_tfds_digits(str(tmp_path / "tfds"))
    from_tfds, _ = _run(
        saved_model,
        tmp_path / "tfds_out",
        "--data",
        "tfds:digits_local",
        "--data-dir",
        str(tmp_path / "tfds"),
        "--split",
        "train+test",
        "--scale",
        "0.0625",
    )
    for other in (from_npz, from_tfds):
        assert other["num_samples"] == 1797
        np.testing.assert_allclose(
            other["top_eigenvalues"], reference["top_eigenvalues"], rtol=1e-4
        )
    limited, _ = _run(
        saved_model,
        tmp_path / "limited",
        "--data",
        "tfds:digits_local",
        "--data-dir",
        str(tmp_path / "tfds"),
        "--limit",
        "100",
    )
    assert limited["num_samples"] == 100
    x_test, y_test = datasets.load_arrays(
        "tfds:digits_local", data_dir=str(tmp_path / "tfds"), split="test"
    )

    # The same samples as the last 297 digits (tfds shuffles them when it writes the files).
    def rows(images, labels):
        table = np.column_stack([labels, images.reshape(len(labels), -1)]).astype(np.int64)
        return table[np.lexsort(table.T[::-1])]

    np.testing.assert_array_equal(rows(x_test, y_test), rows(images[1500:], y[1500:]))


def _bad_cases(tmp_path, saved_model):
    x, y = datasets.load_digits()
    np.savez(tmp_path / "wrong.npz", a=np.zeros((3, 64)))
    np.savez(tmp_path / "narrow.npz", x=np.zeros((5, 10)), y=np.zeros(5, int))
    np.savez(tmp_path / "scalar.npz", x=np.float32(1.0), y=np.int32(1))
    np.savez(tmp_path / "nan.npz", x=np.where(np.arange(64) == 3, np.nan, x), y=y)
    np.savez(tmp_path / "labels.npz", x=x, y=y + 45)
    (tmp_path / "not_a_model.keras").write_text("hello")
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_text.npz").write_text("x,y\n1,2\n")
    np.savez(tmp_path / "onehot.npz", x=x, y=np.eye(10, dtype=np.float32)[y])
    m = str(saved_model)
    return {
        "missing model": (["keras", str(tmp_path / "nope.keras")], "no model file"),
        "not a model": (["keras", str(tmp_path / "not_a_model.keras")], "not a Keras archive"),
        "text data": (["keras", m, "--data", str(tmp_path / "a_text.npz")], "not an .npz file"),
        "one-hot": (
            ["keras", m, "--data", str(tmp_path / "onehot.npz")],
            "use --loss categorical_crossentropy",
        ),
        "wrong suffix": (["keras", str(tmp_path / "wrong.npz")], "expected a Keras model"),
        "missing data": (["keras", m, "--data", str(tmp_path / "x.npz")], "no data file"),
        "npz keys": (["keras", m, "--data", str(tmp_path / "wrong.npz")], "no array named 'x'"),
        "0-d arrays": (["keras", m, "--data", str(tmp_path / "scalar.npz")], "sample axis"),
        "NaN inputs": (["keras", m, "--data", str(tmp_path / "nan.npz")], "NaN or Inf"),
        "labels": (["keras", m, "--data", str(tmp_path / "labels.npz")], "has 10 outputs"),
        "shapes": (["keras", m, "--data", str(tmp_path / "narrow.npz")], "inputs of shape (64,)"),
        "loss": (["keras", m, "--loss", "nonsense"], "unknown Keras loss 'nonsense'"),
        "logits alone": (["keras", m, "--from-logits"], "--from-logits applies to a loss"),
        "logits option": (["keras", m, "--loss", "mse", "--from-logits"], "no from_logits"),
        "split": (["keras", m, "--split", "test"], "--split does not apply to --data digits"),
        "tfds mnist": (
            ["keras", m, "--data", "tfds:mnist", "--data-dir", str(tmp_path)],
            "could not find data",
        ),  # registered: download=False holds
        "tfds": (
            ["keras", m, "--data", "tfds:absent", "--data-dir", str(tmp_path)],
            "never downloads",
        ),
        "out parent": (["keras", m, "--out", str(tmp_path / "a_file" / "x")], "cannot be written"),
        "top": (["keras", m, "--top", "700"], "--top 700 exceeds the model's 610 parameters"),
        "sigma": (["keras", m, "--sigma-squared", "-1"], "expected a positive number"),
        "scale": (["keras", m, "--scale", "nan"], "expected a finite non-zero number"),
        "keys": (["keras", m, "--keys", "x"], "expected two names as X,Y"),
        "coordinator alone": (["demo", "--coordinator", "h:1"], "go(es) with --distributed"),
        "coordinator": (
            ["demo", "--distributed", "--coordinator", "notaport"],
            "--coordinator 'notaport' is not HOST:PORT",
        ),
    }


def test_bad_arguments_and_files_exit_2_with_one_line(saved_model, tmp_path, capsys):
    for name, (argv, expected) in _bad_cases(tmp_path, saved_model).items():
        if "--out" not in argv:
            argv = argv + ["--out", str(tmp_path / "out")]
        try:
            code = main(argv + ["--quiet"])
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
        err = capsys.readouterr().err.strip()
        assert code == 2, name
        assert len(err.splitlines()) == 1 and "error:" in err and expected in err, (name, err)


def test_a_lambda_layer_runs_only_with_unsafe_load(tmp_path, capsys):
    """Keras advised safe_mode=False and the CLI had no way to pass it; the opt-in flag
    runs the file's code, and without it the code does not run."""
    marker = tmp_path / "ran.txt"
    code = eval(f"lambda x: (__import__('pathlib').Path({str(marker)!r}).write_text('x'), x)[1]")
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Lambda(code),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    path = tmp_path / "lambda.keras"
    model.save(path)
    marker.unlink(missing_ok=True)  # building the model ran it here; only loading counts
    argv = [
        "keras",
        str(path),
        "--out",
        str(tmp_path / "out"),
        "--order",
        "5",
        "--top",
        "1",
        "--num-probes",
        "1",
        "--trace-matvecs",
        "6",
        "--limit",
        "50",
        "--quiet",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--unsafe-load" in err and "Lambda" in err and not marker.exists()
    assert main(argv + ["--unsafe-load"]) == 0
    assert marker.exists()


def test_a_renamed_text_file_is_named_as_such(tmp_path, capsys):
    for name in ("text.keras", "text.h5"):
        (tmp_path / name).write_text("not a model")
        assert main(["keras", str(tmp_path / name), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert "not a Keras archive" in err or "not an HDF5 file" in err, err


def test_bad_file_as_a_subprocess(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "jax_spectral", "keras", str(tmp_path / "nope.keras")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert not (tmp_path / "jax-spectral-keras").exists()  # no folder for a failed run
    assert out.stderr.strip().splitlines() == [
        f"jax-spectral keras: error: no model file '{tmp_path / 'nope.keras'}'."
    ]


def test_a_late_failure_keeps_the_density(saved_model, tmp_path, capsys):
    # Identical inputs make the Hessian low-rank: Lanczos finds fewer than 100 distinct
    # eigenvalues, so --top 100 fails after SLQ; the density files are already written.
    x, y = datasets.load_digits()
    np.savez(tmp_path / "flat.npz", x=np.zeros_like(x), y=y)
    argv = [
        "keras",
        str(saved_model),
        "--data",
        str(tmp_path / "flat.npz"),
        "--top",
        "100",
        "--order",
        "20",
        "--num-probes",
        "2",
        "--out",
        str(tmp_path / "out"),
        "--quiet",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--top 100" in err and "invariant subspace" in err
    saved = np.load(tmp_path / "out" / "spectrum.npz")
    assert np.sum(saved["density"]) * (saved["grid"][1] - saved["grid"][0]) == pytest.approx(1.0)
    summary = json.loads((tmp_path / "out" / "spectrum.json").read_text())
    assert summary["settings"]["top"] == 100 and "top_eigenvalues" not in summary
    status = summary["status"]
    assert status["density"] == "done" and status["top_eigenvalues"].startswith("failed: --top")
    assert not status["complete"]


def _dense_curvatures(path):
    """The top eigenvalues of the GGN (J^T H_L J, outputs: the softmax probabilities the
    model returns) and of the empirical Fisher over digits, from jax.jacfwd, jax.hessian and
    per-sample jax.grad of the weights in plain jnp (no operator code)."""
    model = keras.saving.load_model(path)
    x, y = datasets.load_digits()
    weights = [jnp.asarray(v.value) for v in model.trainable_variables]
    flat, unravel = ravel_pytree(weights)

    def probabilities(f, inputs):
        w1, b1, w2, b2 = unravel(f)
        return jax.nn.softmax(jnp.tanh(inputs @ w1 + b1) @ w2 + b2)

    def loss_on(p, labels):
        return -jnp.mean(jnp.log(p[jnp.arange(len(labels)), labels]))

    out = probabilities(flat, x)
    jac = jax.jacfwd(probabilities)(flat, x).reshape(out.size, -1)
    h_out = jax.hessian(loss_on)(out, y).reshape(out.size, out.size)
    ggn = np.asarray(jac.T @ h_out @ jac, np.float64)
    grads = jax.vmap(
        jax.grad(lambda f, xi, yi: loss_on(probabilities(f, xi[None]), yi[None])), (None, 0, 0)
    )(flat, x, y)
    fisher = np.asarray(grads.T @ grads, np.float64) / len(y)
    return [np.linalg.eigvalsh((m + m.T) / 2)[::-1] for m in (ggn, fisher)]


def test_curvature_flag_gives_the_dense_ggn_and_fisher(saved_model, tmp_path):
    ggn, fisher = _dense_curvatures(saved_model)
    for name, reference in (("ggn", ggn), ("fisher", fisher)):
        summary, _ = _run(saved_model, tmp_path / name, "--curvature", name)
        assert summary["settings"]["curvature"] == name and summary["status"]["complete"]
        np.testing.assert_allclose(summary["top_eigenvalues"], reference[:3], rtol=1e-4)
        assert abs(summary["trace"] - reference.sum()) <= 3 * summary["trace_stderr"] + 1e-4


def test_per_layer_densities_match_the_dense_blocks(saved_model, tmp_path):
    summary, saved = _run(saved_model, tmp_path, "--per-layer")
    model = keras.saving.load_model(saved_model)
    x, y = datasets.load_digits()
    weights = [jnp.asarray(v.value) for v in model.trainable_variables]
    flat, unravel = ravel_pytree(weights)

    def loss(f):
        w1, b1, w2, b2 = unravel(f)
        p = jax.nn.softmax(jnp.tanh(x @ w1 + b1) @ w2 + b2)
        return -jnp.mean(jnp.log(p[jnp.arange(len(y)), y]))

    h = np.asarray(jax.hessian(loss)(flat), np.float64)
    assert [e["num_params"] for e in summary["layers"]] == [64 * 8 + 8, 8 * 10 + 10]
    assert summary["status"]["layers"] == "done" and summary["status"]["complete"]
    for i, (lo, hi) in enumerate(((0, 520), (520, 610))):
        exact = np.linalg.eigvalsh(h[lo:hi, lo:hi])
        entry = summary["layers"][i]
        assert entry["extreme_nodes"][1] == pytest.approx(exact[-1], rel=1e-4)
        assert exact[0] - 1e-6 <= entry["extreme_nodes"][0]
        grid, density = saved[f"layer{i}_grid"], saved[f"layer{i}_density"]
        assert np.sum(density) * (grid[1] - grid[0]) == pytest.approx(1.0, rel=1e-3)
    assert (tmp_path / "layers.png").read_bytes().startswith(b"\x89PNG")
    np.testing.assert_allclose(saved["top_eigenvalues"], summary["top_eigenvalues"])
    assert saved["residuals"].shape == (3,)
