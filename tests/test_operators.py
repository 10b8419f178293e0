import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import classification_data, init_mlp, mlp_apply, mlp_loss
from jax.flatten_util import ravel_pytree

from jax_spectral import hessian_operator, lanczos

N, BATCH = 103, 10  # ten full batches and a ragged batch of three


@pytest.fixture
def problem(x64):
    params = init_mlp(jax.random.key(0), [4, 5, 3], jnp.float64)
    x, y = classification_data(jax.random.key(1), N, 4, 3, jnp.float64)
    flat, unravel = ravel_pytree(params)
    whole_mean = jax.hessian(lambda f: mlp_loss(unravel(f), (x, y)))(flat)
    batches = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, N, BATCH)]
    sum_of_batches = sum(jax.hessian(lambda f, b=b: mlp_loss(unravel(f), b))(flat) for b in batches)
    v = jax.random.normal(jax.random.key(2), flat.shape, jnp.float64)
    return params, (x, y), batches, {"mean": whole_mean, "sum": sum_of_batches}, v


def _operators(params, arrays, batches, reduce):
    yield (
        "arrays/scan",
        hessian_operator(mlp_loss, params, arrays, batch_size=BATCH, reduce=reduce, loop="scan"),
    )
    yield (
        "arrays/host",
        hessian_operator(mlp_loss, params, arrays, batch_size=BATCH, reduce=reduce, loop="host"),
    )
    yield "list", hessian_operator(mlp_loss, params, batches, reduce=reduce)
    yield "callable", hessian_operator(mlp_loss, params, lambda: iter(batches), reduce=reduce)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_dataset_hessian_matches_dense(problem, reduce):
    params, arrays, batches, dense, v = problem
    want = dense[reduce] @ v
    for name, op in _operators(params, arrays, batches, reduce):
        assert op.dim == v.shape[0] and op.dtype == np.float64, name
        got = op.matvec(v)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=name)
        got_twice = op.matvec(v)  # a second pass sees the same data
        np.testing.assert_allclose(got_twice, want, rtol=1e-10, atol=1e-12, err_msg=name)


def test_mean_is_not_the_mean_over_batches(problem):
    """The original package divided the summed batch HVPs by the number of batches."""
    params, arrays, batches, dense, v = problem
    op = hessian_operator(mlp_loss, params, batches)
    wrong = dense["sum"] @ v / len(batches)
    assert not np.allclose(op.matvec(v), wrong, rtol=1e-3)


def test_operator_matvec_on_pytrees_and_jit(problem):
    params, arrays, batches, dense, v = problem
    op = hessian_operator(mlp_loss, params, arrays, batch_size=BATCH)
    tree = op.unravel(v)
    np.testing.assert_allclose(op.ravel(op.matvec_tree(tree)), dense["mean"] @ v, rtol=1e-10)
    # The operator is a pytree: its arrays are arguments of the compiled program.
    jitted = jax.jit(lambda o, x: o.matvec(x))(op, v)
    np.testing.assert_allclose(jitted, dense["mean"] @ v, rtol=1e-10)


def test_whole_arrays_without_batch_size_is_one_batch(problem):
    params, arrays, batches, dense, v = problem
    op = hessian_operator(mlp_loss, params, arrays)
    assert op.batch_size == N and op.num_samples == N
    np.testing.assert_allclose(op.matvec(v), dense["mean"] @ v, rtol=1e-10)


def test_duck_typed_tf_data_is_read_with_as_numpy_iterator(problem):
    params, arrays, batches, dense, v = problem

    class FakeDataset:  # the part of tf.data.Dataset the operator uses
        def __iter__(self):
            raise AssertionError("a tf.data.Dataset must be read through as_numpy_iterator")

        def as_numpy_iterator(self):
            return iter([tuple(np.asarray(a) for a in b) for b in batches])

    op = hessian_operator(mlp_loss, params, FakeDataset())
    np.testing.assert_allclose(op.matvec(v), dense["mean"] @ v, rtol=1e-10)


def test_auto_loop_choice():
    params = init_mlp(jax.random.key(0), [4, 5, 3])
    x, y = classification_data(jax.random.key(1), 20, 4, 3)
    mlp_op = hessian_operator(mlp_loss, params, (x, y), batch_size=8)
    assert mlp_op.loop == "scan" and mlp_op.traceable

    def conv_loss(p, batch):
        images, labels = batch
        out = jax.lax.conv_general_dilated(images, p["k"], (1, 1), "SAME")
        return jnp.mean((out.mean(axis=(1, 2, 3)) - labels) ** 2)

    images = np.ones((6, 2, 5, 5), np.float32)
    data = (images, np.zeros(6, np.float32))
    conv_op = hessian_operator(conv_loss, {"k": jnp.ones((3, 2, 3, 3))}, data, batch_size=4)
    assert conv_op.loop == "scan"  # on CPU its convolutions are rewritten, fast in a scan
    stock = hessian_operator(
        conv_loss, {"k": jnp.ones((3, 2, 3, 3))}, data, batch_size=4, rewrite="none"
    )
    assert stock.loop == ("host" if jax.default_backend() == "cpu" else "scan")


# -- documented errors ------------------------------------------------------------------


def test_unknown_reduce_and_loop():
    params = {"w": jnp.ones(2)}
    data = (np.ones((4, 2)),)
    loss = lambda p, b: jnp.sum(b[0] @ p["w"])  # noqa: E731
    with pytest.raises(ValueError, match="reduce must be one of .* got 'MEAN'"):
        hessian_operator(loss, params, data, reduce="MEAN")
    with pytest.raises(ValueError, match="loop must be one of"):
        hessian_operator(loss, params, data, loop="fast")


def test_empty_data():
    params = {"w": jnp.ones(2)}
    loss = lambda p, b: jnp.sum(b[0] @ p["w"])  # noqa: E731
    with pytest.raises(ValueError, match="empty: the arrays have 0 samples"):
        hessian_operator(loss, params, (np.ones((0, 2)),), batch_size=4)
    with pytest.raises(ValueError, match="empty: iterating it yielded no batches"):
        hessian_operator(loss, params, [])
    with pytest.raises(ValueError, match="empty: iterating it yielded no batches"):
        hessian_operator(loss, params, lambda: iter(()))


def test_one_shot_iterator_is_rejected():
    params = {"w": jnp.ones(2)}
    loss = lambda p, b: jnp.sum(b[0] @ p["w"])  # noqa: E731
    batches = [(np.ones((3, 2)),), (np.ones((2, 2)),)]
    with pytest.raises(ValueError, match="one-shot iterator"):
        hessian_operator(loss, params, iter(batches))
    with pytest.raises(ValueError, match="one-shot iterator"):
        hessian_operator(loss, params, (b for b in batches))


def test_a_callable_handing_out_one_shared_iterator_is_rejected():
    params = {"w": jnp.ones(2)}
    loss = lambda p, b: jnp.sum((b[0] @ p["w"]) ** 2)  # noqa: E731
    shared = iter([(np.ones((3, 2)),)] * 3)
    with pytest.raises(ValueError, match="hands out the same iterator on every pass"):
        hessian_operator(loss, params, lambda: shared)


def test_exhausted_second_pass_raises_instead_of_returning_zeros():
    params = {"w": jnp.ones(2)}
    loss = lambda p, b: jnp.sum((b[0] @ p["w"]) ** 2)  # noqa: E731
    batches = [(np.ones((3, 2)),)] * 3
    calls = []

    def source():  # fresh iterators, but the data runs dry after the first pass
        calls.append(1)
        return iter(batches if len(calls) <= 4 else [])

    op = hessian_operator(loss, params, source)  # construction checks and peeks: 3 calls
    np.testing.assert_allclose(op.matvec(jnp.ones(2)), [12.0, 12.0])  # 3 batches x 2 x X^T X 1
    with pytest.raises(ValueError, match="yielded no batches on this pass although an earlier"):
        op.matvec(jnp.ones(2))


def test_stream_operator_refuses_to_be_traced():
    op = hessian_operator(
        lambda p, b: jnp.sum((b[0] @ p) ** 2), jnp.ones(2), lambda: iter([(np.ones((3, 2)),)])
    )
    with pytest.raises(ValueError, match="cannot be traced"):
        jax.jit(lambda o, v: o.matvec(v))(op, jnp.ones(2))


def test_float64_params_without_x64_warn():
    data = (np.ones((3, 2), np.float32),)
    with pytest.warns(UserWarning, match="jax_enable_x64 is off"):
        op = hessian_operator(lambda p, b: jnp.sum((b[0] @ p) ** 2), np.ones(2), data)
    assert op.dtype == np.float32


def test_unsupported_data_and_batch_size_types():
    params = {"w": jnp.ones(2)}
    loss = lambda p, b: jnp.sum(b[0] @ p["w"])  # noqa: E731
    with pytest.raises(TypeError, match="data must be in-memory arrays"):
        hessian_operator(loss, params, 5)
    with pytest.raises(TypeError, match="batch_size must be a positive int"):
        hessian_operator(loss, params, (np.ones((3, 2)),), batch_size=2.5)
    with pytest.raises(ValueError, match="no array leaves"):
        hessian_operator(loss, {}, (np.ones((3, 2)),))


def test_changing_dataset_between_passes_raises():
    params = {"w": jnp.ones(2)}
    loss = lambda p, b: jnp.sum((b[0] @ p["w"]) ** 2)  # noqa: E731
    sizes = iter([3, 3, 3, 3, 5])  # three calls at construction, then one per pass
    op = hessian_operator(loss, params, lambda: iter([(np.ones((next(sizes), 2)),)]))
    op.matvec(jnp.ones(2))
    with pytest.raises(
        ValueError,
        match=r"read 5 samples in 1 batches, not the same samples "
        r"as the first pass \(3 in 1\)",
    ):
        op.matvec(jnp.ones(2))


def _passes(x, y, order, batch_size):
    """A stream whose k-th complete pass reads the samples ``order(k)`` in batches of
    ``batch_size``."""
    completed = [0]

    def new_pass():
        index = order(completed[0])
        for i in range(0, len(index), batch_size):
            yield x[index[i : i + batch_size]], y[index[i : i + batch_size]]
        completed[0] += 1

    return new_pass


def _stream_problem():
    params = init_mlp(jax.random.key(0), [4, 6, 3])
    x, y = classification_data(jax.random.key(1), 90, 4, 3)
    return params, np.asarray(x), np.asarray(y)


def test_a_stream_that_reads_other_samples_on_a_later_pass_is_refused():
    """A random subset per pass (as shuffle().take(n) gives) has the same sample count on
    every pass; it was accepted, mixing matrices (Ritz values outside the true range)."""
    params, x, y = _stream_problem()
    subsets = _passes(x, y, lambda k: np.random.default_rng(k).permutation(90)[:60], 20)
    op = hessian_operator(mlp_loss, params, subsets)
    with pytest.raises(ValueError, match="the data changed between passes"):
        lanczos(op, jax.random.key(2), 8)
    # Later batches changed, first batch and count kept: refused too.
    changed = _passes(x, y, lambda k: np.arange(90) if k < 1 else np.arange(90) % 60, 30)
    op = hessian_operator(mlp_loss, params, changed)
    with pytest.raises(ValueError, match="the data changed between passes"):
        lanczos(op, jax.random.key(2), 8)


@pytest.mark.slow
def test_a_tf_data_stream_shuffled_before_take_is_refused():
    tf = pytest.importorskip("tensorflow")
    params, x, y = _stream_problem()
    data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(90, seed=1).take(60).batch(20)
    op = hessian_operator(mlp_loss, params, data)
    with pytest.raises(ValueError, match="shuffle\\(\\) before take\\(\\)"):
        lanczos(op, jax.random.key(2), 8)
    fixed = tf.data.Dataset.from_tensor_slices((x, y)).take(60).shuffle(60, seed=1).batch(20)
    expected = hessian_operator(mlp_loss, params, (x[:60], y[:60]), batch_size=20)
    got = lanczos(hessian_operator(mlp_loss, params, fixed), jax.random.key(2), 8).tridiag
    want = lanczos(expected, jax.random.key(2), 8).tridiag
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-5)


def test_a_reshuffled_stream_with_a_per_sample_loss_gives_the_dataset_hessian():
    params, x, y = _stream_problem()
    reshuffled = _passes(x, y, lambda k: np.random.default_rng(k).permutation(90), 16)
    got = lanczos(hessian_operator(mlp_loss, params, reshuffled), jax.random.key(2), 10)
    want = lanczos(hessian_operator(mlp_loss, params, (x, y)), jax.random.key(2), 10)
    np.testing.assert_allclose(
        np.asarray(got.tridiag), np.asarray(want.tridiag), rtol=2e-4, atol=2e-5
    )
    # The same batches in another order are the same sum, whatever the loss.
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 90, 16)]
    order = iter(range(10**6))
    rotated = lambda: iter(np.roll(np.arange(6), next(order)).tolist())  # noqa: E731
    op = hessian_operator(_batch_norm_loss, params, lambda: (batches[i] for i in rotated()))
    lanczos(op, jax.random.key(2), 6)


def _batch_norm_loss(params, batch):
    x, y = batch
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)  # batch statistics
    return mlp_loss(params, (x, y))


def test_a_reshuffled_stream_is_refused_when_the_loss_uses_batch_statistics():
    params, x, y = _stream_problem()
    reshuffled = _passes(x, y, lambda k: np.random.default_rng(k).permutation(90), 16)
    op = hessian_operator(_batch_norm_loss, params, reshuffled)
    with pytest.raises(ValueError, match="not a per-sample sum or mean"):
        lanczos(op, jax.random.key(2), 8)
    # A sum loss under reduce="mean" with a smaller last batch weighs samples by where they
    # fell; with equal batches it does not.
    total = lambda p, b: b[0].shape[0] * mlp_loss(p, b)  # noqa: E731
    op = hessian_operator(total, params, reshuffled)
    with pytest.raises(ValueError, match="batch is the sum of its samples' losses"):
        lanczos(op, jax.random.key(2), 8)
    equal = _passes(x, y, lambda k: np.random.default_rng(k).permutation(90), 15)
    got = lanczos(hessian_operator(total, params, equal), jax.random.key(2), 6).tridiag
    want = lanczos(hessian_operator(mlp_loss, params, (x, y)), jax.random.key(2), 6).tridiag
    np.testing.assert_allclose(np.asarray(got) / 15, np.asarray(want), rtol=2e-4, atol=2e-5)


def test_a_batch_term_seen_only_in_second_derivatives_is_a_batch_statistic():
    """A penalty on the batch-mean output at a zero output layer: its value and gradient
    vanish there, its Hessian does not and depends on which samples share a batch. A
    reshuffled stream would apply another matrix on every pass: refused (the check used
    to compare the loss and gradient only, and accepted it)."""
    params, x, y = _stream_problem()
    last = sorted(params)[-1]
    params = {**params, last: jax.tree_util.tree_map(jnp.zeros_like, params[last])}

    def hidden(params, batch):
        return mlp_loss(params, batch) + jnp.sum(jnp.mean(mlp_apply(params, batch[0]), 0) ** 2)

    reshuffled = _passes(x, y, lambda k: np.random.default_rng(k).permutation(90), 16)
    op = hessian_operator(hidden, params, reshuffled)
    assert op.loss_form() is None
    with pytest.raises(ValueError, match="not a per-sample sum or mean"):
        lanczos(op, jax.random.key(2), 8)


def test_batch_size_and_scan_need_arrays():
    params = {"w": jnp.ones(2)}
    loss = lambda p, b: jnp.sum(b[0] @ p["w"])  # noqa: E731
    with pytest.raises(ValueError, match="batch_size applies to in-memory arrays only"):
        hessian_operator(loss, params, [(np.ones((3, 2)),)], batch_size=2)
    with pytest.raises(ValueError, match="loop='scan' needs in-memory arrays"):
        hessian_operator(loss, params, lambda: iter([(np.ones((3, 2)),)]), loop="scan")


def test_bad_batch_size_and_ragged_arrays():
    params = {"w": jnp.ones(2)}
    loss = lambda p, b: jnp.sum(b[0] @ p["w"])  # noqa: E731
    with pytest.raises(ValueError, match="batch_size must be positive"):
        hessian_operator(loss, params, (np.ones((3, 2)),), batch_size=0)
    with pytest.raises(ValueError, match="share a leading sample axis"):
        hessian_operator(loss, params, (np.ones((3, 2)), np.ones(4)), batch_size=2)


def test_operator_rejects_bad_params_and_loss():
    data = (np.ones((3, 2)),)
    with pytest.raises(TypeError, match="dtype int32"):
        hessian_operator(lambda p, b: jnp.sum(b[0]) * 1.0, {"n": jnp.ones(2, jnp.int32)}, data)
    with pytest.raises(ValueError, match="must return a scalar"):
        hessian_operator(lambda p, b: b[0] @ p["w"], {"w": jnp.ones(2)}, data)


@pytest.mark.parametrize("data_kind", ["arrays", "list"])
def test_non_finite_loss_raises_naming_the_step(data_kind):
    params = {"w": jnp.ones(2)}
    x = np.ones((4, 2), np.float32)
    x[2, 0] = np.nan
    data = (x,) if data_kind == "arrays" else [(x[:2],), (x[2:],)]

    def loss(p, b):
        return jnp.mean((b[0] @ p["w"]) ** 2)

    op = hessian_operator(loss, params, data)
    assert np.all(np.isnan(op.matvec(jnp.ones(2))))
    with pytest.raises(FloatingPointError, match="Lanczos step 0 .*NaN or Inf"):
        lanczos(op, jax.random.key(0), 2)


def test_nan_from_the_log_of_zero_is_caught_even_when_the_hvp_is_finite():
    # The loss is -inf (log 0) but its gradient does not depend on it.
    def loss(p, b):
        return jnp.sum(p["w"] ** 2) + jnp.log(jnp.sum(b[0]) * 0.0)

    op = hessian_operator(loss, {"w": jnp.ones(2)}, (np.ones((3, 2)),))
    assert np.all(np.isnan(op.matvec(jnp.ones(2))))


class _ArrayLike:
    """A foreign tensor type (as a tf.Tensor or a CPU torch.Tensor is to JAX): shape,
    dtype and __array__, nothing else. Counts its conversions."""

    conversions = 0

    def __init__(self, array):
        self._array = np.asarray(array)
        self.shape, self.dtype = self._array.shape, self._array.dtype

    def __array__(self, dtype=None, copy=None):
        type(self).conversions += 1
        return self._array if dtype is None else self._array.astype(dtype)


def test_a_list_of_in_memory_batches_is_stacked_and_scanned(problem):
    """Ten batches of 10 and one of 3: stacked once, scanned like arrays with batch_size,
    the last batch the exact remainder."""
    params, arrays, batches, dense, v = problem
    op = hessian_operator(mlp_loss, params, batches)
    assert op.traceable and op.stream is None
    assert (op.num_samples, op.batch_size) == (N, BATCH)
    assert jax.tree_util.tree_leaves(op.stacked)[0].shape[:2] == (N // BATCH, BATCH)
    np.testing.assert_allclose(
        jax.jit(op.matvec)(v), dense["mean"] @ v, rtol=1e-10, atol=1e-12
    )  # traceable: the whole pass runs inside jit
    op_sum = hessian_operator(mlp_loss, params, batches[:4], reduce="sum")
    assert op_sum.remainder is None  # four equal batches, no remainder
    flat, unravel = ravel_pytree(params)
    want = sum(jax.hessian(lambda f, b=b: mlp_loss(unravel(f), b))(flat) for b in batches[:4])
    np.testing.assert_allclose(op_sum.matvec(v), want @ v, rtol=1e-10, atol=1e-12)


def test_stacked_lists_keep_each_batch_whole(x64):
    """A loss using batch statistics: stacking must not mix samples across batches."""

    def loss(w, batch):
        (x,) = batch
        z = x @ w
        return jnp.mean((z - jnp.mean(z)) ** 4)

    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((6, 3)),) for _ in range(4)] + [(rng.standard_normal((2, 3)),)]
    w = jnp.asarray(rng.standard_normal(3))
    stacked = hessian_operator(loss, w, batches)
    streamed = hessian_operator(loss, w, lambda: iter(batches))
    assert stacked.traceable and not streamed.traceable
    want = sum(len(b[0]) / 26 * jax.hessian(loss)(w, b) for b in batches)
    for op in (stacked, streamed):
        np.testing.assert_allclose(op.matvec(jnp.ones(3)), want @ np.ones(3), rtol=1e-10)


def test_lists_that_cannot_be_stacked_are_streamed_correctly(problem):
    params, arrays, batches, dense, v = problem
    x, y = arrays
    uneven = [(x[:10], y[:10]), (x[10:13], y[10:13]), (x[13:], y[13:])]  # 10, 3, 90
    op = hessian_operator(mlp_loss, params, uneven)
    assert not op.traceable
    np.testing.assert_allclose(op.matvec(v), dense["mean"] @ v, rtol=1e-10, atol=1e-12)


def test_array_like_batches_are_converted_once_per_pass(problem):
    params, arrays, batches, dense, v = problem
    foreign = [tuple(_ArrayLike(a) for a in b) for b in batches]
    _ArrayLike.conversions = 0
    listed = hessian_operator(mlp_loss, params, foreign)  # stacked at construction
    after_construction = _ArrayLike.conversions
    assert after_construction > 0 and listed.traceable
    np.testing.assert_allclose(listed.matvec(v), dense["mean"] @ v, rtol=1e-10, atol=1e-12)
    assert _ArrayLike.conversions == after_construction  # never again

    streamed = hessian_operator(mlp_loss, params, lambda: iter(foreign))
    _ArrayLike.conversions = 0
    vs = jnp.stack([v, 2 * v, 3 * v, 4 * v, 5 * v])  # two chunks of tangents, one pass
    got = streamed.matmat(vs)
    assert _ArrayLike.conversions == 2 * len(foreign)  # each leaf of each batch, once
    np.testing.assert_allclose(got, vs @ dense["mean"], rtol=1e-10, atol=1e-12)


def test_integer_inputs_give_the_float_result(x64):
    def loss(w, batch):
        x, y = batch
        return jnp.mean((x @ w - y) ** 2)

    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, (20, 3)).astype(np.int32)
    y = rng.standard_normal(20)
    w = jnp.zeros(3)
    want = 2 * x.T.astype(np.float64) @ x / 20
    as_ints = hessian_operator(loss, w, [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])])
    np.testing.assert_allclose(as_ints.matvec(jnp.ones(3)), want @ np.ones(3), rtol=1e-12)


def test_bad_lists_and_batches_are_named():
    def loss(w, batch):
        x, y = batch
        return jnp.mean((x @ w - y) ** 2)

    x = np.ones((4, 2), np.float32)
    with pytest.raises(ValueError, match="item 1 of the data list is a one-shot iterator"):
        hessian_operator(loss, jnp.ones(2), [(x, x[:, 0]), iter([(x, x[:, 0])])])
    # Inputs and labels cut into batches of different sizes: the loss cannot be evaluated.
    for data in ([(x, x[:3, 0])], lambda: iter([(x, x[:3, 0])])):
        with pytest.raises((ValueError, TypeError), match="(?i)incompatible shapes"):
            hessian_operator(loss, jnp.ones(2), data)
    with pytest.raises(ValueError, match="batch_size applies to in-memory arrays only"):
        hessian_operator(loss, jnp.ones(2), [(x, x[:, 0])], batch_size=2)
    with pytest.raises(ValueError, match="no leaf of the batch has a leading sample axis"):
        hessian_operator(loss, jnp.ones(2), lambda: iter([(np.float32(1.0), np.float32(2.0))]))


def test_per_batch_leaves_that_are_not_samples_are_kept(x64):
    """Keys, class weights: leaves without the sample axis ride along with their batch;
    the sample count comes from the first leaf that has an axis."""

    def loss(w, batch):
        x, y, class_weight, key = batch
        noise = 0.0 * jax.random.normal(key, ())  # a per-batch key, as for dropout
        return jnp.mean(class_weight[y] * (x @ w) ** 2) + noise

    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 3))
    y = rng.integers(0, 2, 10)
    weights = np.array([1.0, 3.0])
    cuts = [(0, 4), (4, 8), (8, 10)]
    batches = [(x[a:b], y[a:b], weights, jax.random.key(i)) for i, (a, b) in enumerate(cuts)]
    op = hessian_operator(loss, jnp.zeros(3), batches)
    assert op.traceable and op.num_samples == 10
    want = sum((b - a) / 10 * 2 * (x[a:b].T * weights[y[a:b]]) @ x[a:b] / (b - a) for a, b in cuts)
    np.testing.assert_allclose(op.matvec(jnp.ones(3)), want @ np.ones(3), rtol=1e-12)


def test_a_list_too_large_for_the_device_stays_a_stream(problem, monkeypatch):
    import jax_spectral.costs as costs

    params, arrays, batches, dense, v = problem
    monkeypatch.setattr(costs, "free_device_bytes", lambda device=None: 1000)
    op = hessian_operator(mlp_loss, params, batches)
    assert not op.traceable and op.stream is not None
    np.testing.assert_allclose(op.matvec(v), dense["mean"] @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("source", ["scan", "stream"])
def test_bf16_sums_over_many_batches_keep_float32_accuracy(source):
    """1,024 bf16 batch products summed in bf16 lost 11% of |Hv|; the sums are float32."""

    def loss(w, batch):
        (xb,) = batch
        return jnp.mean((xb @ w) ** 2)

    x = np.random.default_rng(0).standard_normal((4096, 8)).astype(jnp.bfloat16)
    if source == "scan":
        op = hessian_operator(loss, jnp.zeros(8, jnp.bfloat16), (x,), batch_size=4)
    else:
        batches = [(x[i : i + 4],) for i in range(0, 4096, 4)]
        op = hessian_operator(loss, jnp.zeros(8, jnp.bfloat16), lambda: iter(batches))
    got = np.asarray(op.matvec(jnp.ones(8, jnp.bfloat16)), np.float64)
    assert op.matvec(jnp.ones(8)).dtype == jnp.bfloat16  # rounded once, at the end
    x64 = np.asarray(x, np.float64)
    want = 2 * x64.T @ x64 / 4096 @ np.ones(8)
    assert np.abs(got - want).max() < 0.01 * np.abs(want).max()


def test_pytrees_of_another_structure_are_refused(problem):
    """Same total size, other structure: flattening would misalign the entries."""
    params, arrays, batches, dense, v = problem
    op = hessian_operator(mlp_loss, params, arrays, batch_size=BATCH)
    tree = op.unravel(v)
    swapped = {"layer0": tree["layer1"], "layer1": tree["layer0"]}  # other shapes, same size
    assert jax.tree_util.tree_structure(swapped) == jax.tree_util.tree_structure(tree)
    with pytest.raises(ValueError, match=r"\['layer0'\]\['b'\] has shape \(3,\)"):
        op.matvec_tree(swapped)
    flat_leaves = [jnp.ravel(x) for x in jax.tree_util.tree_leaves(tree)]
    for bad in (flat_leaves, {"w": v}):
        with pytest.raises(ValueError, match="same pytree structure as params"):
            op.matvec_tree(bad)
        with pytest.raises(ValueError, match="same pytree structure as params"):
            op.ravel(bad)
        with pytest.raises(ValueError, match="same pytree structure as params"):
            lanczos(op, None, 3, v0=bad)
        with pytest.raises(ValueError, match="same pytree structure as params"):
            lanczos(op.matvec_tree, None, 3, v0=bad)
    np.testing.assert_allclose(
        op.matvec_tree(tree)["layer1"]["b"], op.unravel(op.matvec(v))["layer1"]["b"]
    )
    with pytest.raises(ValueError, match="same pytree structure as params"):
        lanczos(lambda t: t, None, 3, like=params, v0={"w": v})
    assert int(lanczos(lambda t: t, None, 1, like=params, v0=v).num_steps) == 1  # flat v0


def test_a_float16_sum_that_overflows_is_nan_not_inf():
    def loss(w, batch):
        return 1e3 * jnp.sum((batch[0] @ w) ** 2)

    x = np.full((1024, 4), 2.0, np.float16)
    op = hessian_operator(loss, jnp.zeros(4, jnp.float16), (x,), batch_size=1, reduce="sum")
    got = np.asarray(op.matvec(jnp.ones(4, jnp.float16)))
    assert got.dtype == np.float16 and np.all(np.isnan(got))


def test_stream_hashes_see_structured_changes_and_key_leaves():
    """The per-sample hash was a linear sum of words: x and -x (a reflection augmentation
    per pass) hashed equal and the stream was accepted with a different matrix."""
    from jax_spectral.data import sample_hashes

    x = np.random.default_rng(0).normal(size=(16, 8))
    flipped = x.copy()
    flipped[:, :2] *= -1
    assert np.all(sample_hashes((x,)) != sample_hashes((flipped,)))
    assert np.all(sample_hashes((x,)) != sample_hashes((-x,)))
    swapped = np.arange(48, dtype=np.uint8).reshape(2, 24)
    other = swapped.copy()
    other[:, [7, 15]] = other[:, [15, 7]]
    assert np.all(sample_hashes((swapped,)) != sample_hashes((other,)))
    keys = jax.random.split(jax.random.key(0), 16)  # typed keys as a batch leaf
    assert sample_hashes((x, keys)).shape == (16,)


def test_a_checkpointed_stream_whose_loss_needs_its_batch_size(tmp_path):
    params, x, y = _stream_problem()
    batches = [(x[i : i + 30], y[i : i + 30]) for i in range(0, 90, 30)]

    def fixed(p, b):  # written for batches of 30 only
        return mlp_loss(p, (b[0].reshape(30, 4), b[1]))

    op = hessian_operator(fixed, params, lambda: iter(batches))
    lanczos(op, jax.random.key(2), 5, checkpoint=tmp_path / "c")


def test_misleading_inputs_get_messages_that_name_them():
    """matvec on a pytree said "entry not a 2- or 3- tuple"; a complex vector lost its
    imaginary part silently; [X, y] built an operator over two 'batches', X and y, and
    returned a plausible spectrum of the wrong matrix."""
    params, x, y = _stream_problem()
    op = hessian_operator(mlp_loss, params, (x, y))
    with pytest.raises(TypeError, match="use matvec_tree"):
        op.matvec(params)
    with pytest.raises(TypeError, match="imaginary part would be dropped"):
        op.matvec(jnp.ones(op.dim) * (1 + 1j))
    with pytest.raises(TypeError, match="imaginary part would be dropped"):
        op.matmat(jnp.ones((2, op.dim), jnp.complex64))
    with pytest.raises(ValueError, match=r"pass a tuple, \(X, y\)"):
        hessian_operator(mlp_loss, params, [x, y])


def test_processes_must_each_own_an_equal_contiguous_block_of_the_data_axis():
    # The layout rule for several processes, checked on stand-in meshes (process 0 here).
    from types import SimpleNamespace

    from jax_spectral.operators import _data_devices_of_this_process as owned

    def mesh(owners, names=("data",)):
        devices = np.vectorize(lambda p: SimpleNamespace(process_index=int(p)), otypes=[object])(
            np.asarray(owners)
        )
        return SimpleNamespace(devices=devices, axis_names=names)

    assert owned(mesh([0, 0, 1, 1]), "data") == 2
    assert owned(mesh([[0, 0], [1, 1]], ("data", "model")), "data") == 1  # model within
    for bad, names in (
        ([0, 1, 0, 1], ("data",)),  # interleaved
        ([0, 0, 0, 1], ("data",)),  # unequal shares
        ([[0, 1], [0, 1]], ("data", "model")),  # model axis across processes
    ):
        with pytest.raises(ValueError, match="mesh axis 'data'"):
            owned(mesh(bad, names), "data")
