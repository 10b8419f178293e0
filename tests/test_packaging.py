"""The package as a user meets it: imports, the README's code, the command line."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import jax_spectral
from jax_spectral.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_import_is_light():
    heavy = "('keras', 'tensorflow', 'matplotlib', 'flax')"
    code = f"import sys, jax_spectral; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    code = code.replace("import sys, jax_spectral", "import sys, keras_bridge")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"  # the bridge imports Keras only when it is used


def test_public_names_and_version():
    for name in jax_spectral.__all__:
        assert hasattr(jax_spectral, name), name
    assert isinstance(jax_spectral.__version__, str) and jax_spectral.__version__


def _code_blocks(name):
    return re.findall(r"```python\n(.*?)```", (ROOT / name).read_text(), flags=re.S)


@pytest.mark.parametrize(
    "name", ["README.md", pytest.param("docs/guide.md", marks=pytest.mark.slow)]
)
def test_documented_code_runs_as_written(name):
    """Each page's examples run in order, in one namespace (the Keras ones in the slow
    suite: they need TensorFlow)."""
    blocks = _code_blocks(name)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        if "tensorflow" not in block:
            exec(compile(block, name, "exec"), namespace)  # noqa: S102


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:loss_function returned an array:UserWarning")
@pytest.mark.parametrize("name", ["README.md", "docs/guide.md"])
def test_documented_keras_code_runs_as_written(name):  # the guide's example shows that warning
    blocks = _code_blocks(name)
    assert any("tensorflow" in block for block in blocks)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, name, "exec"), namespace)  # noqa: S102


def test_readme_is_short_and_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 6500
    for target in re.findall(r"\]\(([^)#:]+)\)", text):  # relative links only
        assert (ROOT / target).exists(), target


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    lines = [ln.strip() for ln in (ROOT / "README.md").read_text().splitlines()]
    commands = [ln for ln in lines[:12] if ln.startswith("python3 -m venv")]
    assert len(commands) == 2
    assert commands[0].endswith("jax-spectral demo")
    assert commands[1].endswith("python -m pytest")
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_ci_tests_the_minimum_jax_that_pyproject_declares():
    pinned = dict(
        line.split("==")
        for line in (ROOT / ".ci" / "minimum.txt").read_text().splitlines()
        if "==" in line
    )
    declared = (ROOT / "pyproject.toml").read_text()
    assert set(pinned) == {"jax", "jaxlib"}
    for name, version in pinned.items():
        assert f'"{name}>={version}"' in declared
    assert 'PIP_CONSTRAINT="$PWD/.ci/minimum.txt"' in (ROOT / ".ci" / "run").read_text()


@pytest.mark.skipif(
    not os.environ.get("JAX_SPECTRAL_REQUIRE_ONEDNN"), reason="set by .ci/run, which builds native/"
)
def test_ci_tests_the_compiled_kernels():
    # .ci/run builds native/; without this the oneDNN tests would skip and pass unseen.
    from jax_spectral import onednn

    assert onednn.available(), "native/ was not built or its library did not load"


def test_license_and_citation():
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()
    citation = (ROOT / "CITATION.cff").read_text()
    assert "cff-version: 1.2.0" in citation and "license: Apache-2.0" in citation
    assert "Hessian Eigenvalue Density" in citation and "family-names: Ghorbani" in citation


@pytest.mark.slow
def test_demo_in_process(tmp_path, capsys):
    argv = ["demo", "--out", str(tmp_path), "--order", "30", "--train-steps", "50"]
    assert main(argv + ["--num-probes", "3"]) == 0
    printed = capsys.readouterr().out
    assert "top eigenvalues:" in printed and str(tmp_path / "spectrum.npz") in printed
    assert "cost: about" in printed and "trace:" in printed
    saved = np.load(tmp_path / "spectrum.npz")
    grid, density = saved["grid"], saved["density"]
    assert np.all(density >= 0)
    assert np.sum(density) * (grid[1] - grid[0]) == pytest.approx(1.0)
    assert saved["tridiags"].shape == (3, 30, 30)
    summary = json.loads((tmp_path / "spectrum.json").read_text())
    assert summary["num_params"] == 2410 and summary["settings"]["num_probes"] == 3
    top = summary["top_eigenvalues"]
    assert top == sorted(top, reverse=True) and top[0] > 0 and all(summary["converged"])
    # The top Ritz value of any probe cannot exceed the top eigenvalue (Cauchy interlacing).
    assert np.sort(saved["nodes"], axis=1)[:, -1].max() <= top[0] * (1 + 1e-5)
    assert summary["trace"] > 0 and summary["trace_stderr"] >= 0
    assert (tmp_path / "density.png").read_bytes().startswith(b"\x89PNG")
    assert summary["status"] == {
        "complete": True,
        "density": "done",
        "top_eigenvalues": "done",
        "trace": "done",
        "figure": "done",
    }


@pytest.mark.slow
def test_demo_over_training_records_and_draws(tmp_path, capsys):
    from jax_spectral import training

    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "step_000000777.json").write_text("{}")  # an earlier run's
    argv = ["demo", "--out", str(tmp_path), "--order", "20", "--train-steps", "40"]
    assert main(argv + ["--num-probes", "2", "--over-training", "2", "--quiet"]) == 0
    records = training.load(tmp_path / "training")
    assert [r["step"] for r in records] == [0, 20, 40]
    assert (tmp_path / "training.png").read_bytes().startswith(b"\x89PNG")
    summary = json.loads((tmp_path / "spectrum.json").read_text())
    assert summary["over_training"]["records"] == 3
    # the last record is taken at the weights the demo then analyses
    assert records[-1]["top_eigenvalues"][0] == pytest.approx(summary["top_eigenvalues"][0], 1e-3)
    # a rerun without the flag leaves none of these beside its own files
    assert main(argv + ["--num-probes", "2", "--quiet"]) == 0
    assert not (tmp_path / "training.png").exists()
    assert not list((tmp_path / "training").glob("step_*.json"))


@pytest.mark.slow
def test_demo_of_order_one_reports_that_outliers_were_not_sought(tmp_path, capsys):
    """One Lanczos step leaves one node a probe: outliers() raised, and the demo crashed."""
    argv = ["demo", "--out", str(tmp_path), "--order", "1", "--num-probes", "2"]
    assert main(argv + ["--train-steps", "20", "--quiet"]) == 0
    summary = json.loads((tmp_path / "spectrum.json").read_text())
    assert "at least two distinct nodes" in summary["outliers"]["not sought"]
    assert "outliers: not sought" in capsys.readouterr().out


@pytest.mark.slow
def test_ctrl_c_during_over_training_keeps_the_records_and_says_so(tmp_path, capsys, monkeypatch):
    """It said "interrupted before any result" although the records were on disk."""
    from jax_spectral import cli, training

    original = cli._Recorder.__call__

    def record_then_interrupt(self, step, params):
        if step > 0:  # Ctrl-C in the second recording
            raise KeyboardInterrupt
        original(self, step, params)

    monkeypatch.setattr(cli._Recorder, "__call__", record_then_interrupt)
    argv = ["demo", "--out", str(tmp_path), "--order", "20", "--train-steps", "40"]
    assert main(argv + ["--num-probes", "2", "--over-training", "2", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "after 1 recorded spectra" in err and "before any result" not in err
    assert [r["step"] for r in training.load(tmp_path / "training")] == [0]
    assert (tmp_path / "training.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_a_rerun_replaces_every_output_and_records_adjustments(tmp_path, capsys, monkeypatch):
    """An earlier run's files went unreplaced when a stage was skipped (a png beside new
    npz and json); settings changed without a word (--trace-matvecs 3 became 6)."""
    from jax_spectral import cli

    (tmp_path / "density.png").write_text("an earlier run's figure")
    (tmp_path / "spectrum.json").write_text("{}")
    monkeypatch.setattr(cli, "_draw", lambda *a: "not drawn (test)")
    argv = [
        "demo",
        "--out",
        str(tmp_path),
        "--order",
        "10",
        "--train-steps",
        "5",
        "--trace-matvecs",
        "3",
        "--num-probes",
        "2",
        "--quiet",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert not (tmp_path / "density.png").exists()
    summary = json.loads((tmp_path / "spectrum.json").read_text())
    assert summary["settings"]["trace_matvecs"] == 6
    notes = summary["adjustments"]
    assert any("--trace-matvecs 3" in n for n in notes) and any(
        "80 Lanczos steps" in n for n in notes
    )
    assert all(f"note: {n}" in printed for n in notes)
    assert summary["status"]["figure"] == "not drawn (test)" and summary["status"]["complete"]


@pytest.mark.slow
def test_ctrl_c_in_the_demo_writes_what_finished(tmp_path):
    """SIGINT during SLQ: exit 130 within seconds, one line on stderr besides the progress
    bars, the density of the finished steps written and marked interrupted (the run went
    on to the end, then lost it all)."""
    import threading

    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jax_spectral",
            "demo",
            "--out",
            str(tmp_path),
            "--order",
            "2000",
            "--train-steps",
            "5",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    err, signalled = [], []

    def read():  # tqdm redraws with \r: signal once SLQ has done some steps (compiled)
        while chunk := os.read(child.stderr.fileno(), 4096):
            err.append(chunk.decode())
            shown = re.findall(r"SLQ \(5 probes\):[^\r\n]*?(\d+)/2000 \[", "".join(err))
            if not signalled and shown and int(shown[-1]) >= 20:
                child.send_signal(signal.SIGINT)
                signalled.append(time.perf_counter())

    reader = threading.Thread(target=read)
    reader.start()
    code = child.wait(timeout=300)
    reader.join()
    waited = time.perf_counter() - signalled[0]
    lines = [ln for ln in re.split(r"[\r\n]", "".join(err)) if ln.strip()]
    messages = [ln for ln in lines if not re.search(r"\d+/\d+ \[", ln)]  # not a bar
    print(f"exited {waited:.2f} s after SIGINT")
    # The run stops after the segment in progress (its status below says it was
    # interrupted); the time also covers writing the files, drawing the figure and the
    # interpreter's exit, which took 5-6 s with another test process busy on two cores.
    assert code == 130 and waited < 10, (code, waited, messages)
    assert len(messages) == 1 and "interrupted (SLQ" in messages[0], messages
    assert str(tmp_path) in messages[0] and lines[-1] == messages[0]
    summary = json.loads((tmp_path / "spectrum.json").read_text())
    status = summary["status"]
    assert status["density"].startswith("interrupted after ") and not status["complete"]
    assert status["top_eigenvalues"] == "not run" and "top_eigenvalues" not in summary
    steps = int(status["density"].split()[2])
    assert 20 <= steps < 2000 and summary["slq_steps"] == [steps] * 5
    saved = np.load(tmp_path / "spectrum.npz")
    assert np.sum(saved["density"]) * (saved["grid"][1] - saved["grid"][0]) == pytest.approx(1.0)


@pytest.mark.slow
def test_demo_as_a_subprocess(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "jax_spectral",
            "demo",
            "--out",
            str(tmp_path),
            "--order",
            "10",
            "--train-steps",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "spectrum.npz").is_file() and (tmp_path / "spectrum.json").is_file()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["demo", "--order", "0"], "expected a positive integer"),
        (["demo", "--order", "ten"], "expected a positive integer"),
        (["demo", "--sigma-squared", "-1"], "expected a positive number"),
        (["nonsense"], "invalid choice"),
        ([], "required"),
    ],
)
def test_bad_arguments_exit_with_code_2_and_one_line(argv, expected, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2
    assert len(err.splitlines()) == 1 and "error:" in err and expected in err


def test_a_failed_run_creates_no_folder(tmp_path, capsys):
    out = tmp_path / "new" / "out"
    assert main(["demo", "--out", str(out), "--top", "5000", "--train-steps", "2"]) == 2
    assert "--top 5000 exceeds" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_unwritable_out_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "sub"):
        assert main(["demo", "--out", str(out)]) == 2
        err = capsys.readouterr()
        assert err.out == ""  # nothing trained
        assert len(err.err.strip().splitlines()) == 1 and str(out) in err.err


@pytest.mark.slow
def test_without_matplotlib_the_demo_writes_its_data_and_says_so(tmp_path, capsys, monkeypatch):
    """The figure's ImportError was caught around an import that never raises, so a
    missing matplotlib ended the run (exit 1) after the density was written."""
    import sys

    # None in sys.modules makes "import matplotlib.pyplot" raise ImportError. (Replacing
    # builtins.__import__ for the whole run instead crashed the process inside XLA's
    # compiler in long test runs.)
    for name in ("matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)
    argv = [
        "demo",
        "--out",
        str(tmp_path),
        "--order",
        "10",
        "--train-steps",
        "5",
        "--num-probes",
        "2",
        "--trace-matvecs",
        "6",
        "--quiet",
    ]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "spectrum.json").read_text())
    assert summary["status"]["complete"] and "pip install" in summary["status"]["figure"]
    assert not (tmp_path / "density.png").exists()
    assert "figure: not drawn" in capsys.readouterr().out
