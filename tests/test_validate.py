"""The shared argument checks and the atomic file writer."""

import numpy as np
import pytest

import jax_spectral as js
from jax_spectral.validate import ArgumentTypeError, count, write_atomic


@pytest.mark.parametrize("value", [True, 2.0, "3", None, np.float32(4)])
def test_a_non_int_count_is_a_type_error_and_a_value_error(value):
    with pytest.raises(TypeError, match="order must be a positive int"):
        count("order", value)
    with pytest.raises(ValueError, match="order must be a positive int"):
        count("order", value)


def test_counts_below_the_minimum_and_numpy_ints():
    with pytest.raises(ValueError, match="grid_len must be an int >= 2, got 1"):
        count("grid_len", 1, 2)
    assert count("k", np.int64(3)) == 3 and type(count("k", np.int64(3))) is int
    assert not issubclass(ValueError, ArgumentTypeError)


def _op():
    return js.as_operator(lambda v: v, dim=3)


@pytest.mark.parametrize(
    "call",
    [
        lambda: js.lanczos(lambda v: v, None, 2.5, dim=3),
        lambda: js.slq(_op(), None, num_probes=0, order=2),
        lambda: js.eigenpairs(_op(), None, k=True),
        lambda: js.hutchpp(_op(), None, num_matvecs=2),
        lambda: js.estimate(3, order=-1),
        lambda: js.tridiag_to_density(np.eye(2)[None], grid_len=1),
    ],
)
def test_every_public_count_goes_through_the_one_check(call):
    with pytest.raises(ValueError, match=r"must be (a positive int|an int >= \d)"):
        call()


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "out.json"
    write_atomic(path, lambda tmp: tmp.write_text("first"))
    assert path.read_text() == "first"

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, fail, durable=True)
    assert path.read_text() == "first"  # the old file is intact ...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # ... no temporary left
    write_atomic(path, lambda tmp: tmp.write_text("second"), durable=True)
    assert path.read_text() == "second"


def test_write_atomic_with_a_writer_that_adds_a_suffix_and_without_one(tmp_path):
    """numpy.savez adds ".npz" to a name without it: the temporary file must keep the
    target's suffix, or the rename misses the file that was written."""
    write_atomic(tmp_path / "arrays.npz", lambda tmp: np.savez(tmp, a=np.arange(3)))
    assert np.load(tmp_path / "arrays.npz")["a"].tolist() == [0, 1, 2]
    write_atomic(tmp_path / "plain", lambda tmp: tmp.write_text("x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arrays.npz", "plain"]
