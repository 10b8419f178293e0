"""The paper's analyses: the gradient's share in the top eigenspace and deflated SLQ, against
dense float64 references (jax.hessian, jax.grad, numpy.linalg.eigh) and a known spectrum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import classification_data, init_mlp, mlp_loss
from jax.flatten_util import ravel_pytree

import jax_spectral as js

N, BATCH = 47, 10  # four batches of ten and one of seven


@pytest.fixture
def mlp(x64):
    params = init_mlp(jax.random.key(0), [6, 5, 3], jnp.float64)
    x, y = classification_data(jax.random.key(1), N, 6, 3, jnp.float64)
    return params, jnp.asarray(x), jnp.asarray(y)


def _dense(params, x, y):
    flat, unravel = ravel_pytree(params)
    hessian = np.asarray(jax.hessian(lambda f: mlp_loss(unravel(f), (x, y)))(flat))
    gradient = np.asarray(jax.grad(lambda f: mlp_loss(unravel(f), (x, y)))(flat))
    return hessian, gradient, unravel


def _reference_share(hessian, gradient, k):
    values, vectors = np.linalg.eigh(hessian)
    top = vectors[:, ::-1][:, :k]  # largest first
    return np.cumsum((top.T @ gradient) ** 2) / np.sum(gradient**2), values[::-1][:k]


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_operator_gradient_equals_jax_grad(mlp, reduce):
    params, x, y = mlp
    flat, unravel = ravel_pytree(params)
    op = js.hessian_operator(mlp_loss, params, (x, y), batch_size=BATCH, reduce=reduce)
    parts = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, N, BATCH)]
    per_batch = np.stack(
        [np.asarray(jax.grad(lambda f, b=b: mlp_loss(unravel(f), b))(flat)) for b in parts]
    )
    np.testing.assert_allclose(op.gradient(per_batch=True), per_batch, rtol=1e-12, atol=1e-14)
    if reduce == "mean":
        want = np.asarray(jax.grad(lambda f: mlp_loss(unravel(f), (x, y)))(flat))
    else:
        want = per_batch.sum(axis=0)
    np.testing.assert_allclose(op.gradient(), want, rtol=1e-12, atol=1e-14)
    stream = js.hessian_operator(mlp_loss, params, lambda: iter(parts), reduce=reduce)
    np.testing.assert_allclose(stream.gradient(), want, rtol=1e-12, atol=1e-14)
    block = js.hessian_operator(mlp_loss, params, (x, y), batch_size=BATCH, wrt="layer1")
    n0 = ravel_pytree(params["layer0"])[0].size
    full = np.asarray(jax.grad(lambda f: mlp_loss(unravel(f), (x, y)))(flat))
    np.testing.assert_allclose(block.gradient(), full[n0:], rtol=1e-12, atol=1e-14)


def test_gradient_share_equals_dense_eigh(mlp):
    params, x, y = mlp
    hessian, gradient, _ = _dense(params, x, y)
    op = js.hessian_operator(mlp_loss, params, (x, y), batch_size=BATCH)
    pairs = js.eigenpairs(op, jax.random.key(0), 5, order=op.dim)
    got = js.gradient_share(op, pairs, per_batch=True)
    want, values = _reference_share(hessian, gradient, 5)
    np.testing.assert_allclose(got.share, want, atol=1e-10)
    np.testing.assert_allclose(got.eigenvalues, values, atol=1e-10)
    assert np.all(np.diff(got.share) >= 0) and got.share[-1] <= 1
    np.testing.assert_allclose(got.residuals, pairs.residuals)
    assert got.gradient_norm == pytest.approx(np.linalg.norm(gradient), rel=1e-12)
    # each mini-batch gradient against the same dense eigenvectors
    flat, unravel = ravel_pytree(params)
    top = np.linalg.eigh(hessian)[1][:, ::-1][:, :5]
    for i, lo in enumerate(range(0, N, BATCH)):
        b = (x[lo : lo + BATCH], y[lo : lo + BATCH])
        g = np.asarray(jax.grad(lambda f, b=b: mlp_loss(unravel(f), b))(flat))
        want_b = np.cumsum((top.T @ g) ** 2) / np.sum(g**2)
        np.testing.assert_allclose(got.batch_share[i], want_b, atol=1e-10)


def test_gradient_share_takes_any_spanning_vectors_and_refuses_bad_ones(mlp):
    params, x, y = mlp
    hessian, gradient, _ = _dense(params, x, y)
    op = js.hessian_operator(mlp_loss, params, (x, y))
    top = np.linalg.eigh(hessian)[1][:, ::-1][:, :3].T
    mixed = np.stack([top[0], top[0] + 2 * top[1], top[2] - top[1] + 3 * top[0]])
    got = js.gradient_share(op, mixed, gradient=gradient)  # same nested spans
    np.testing.assert_allclose(got.share, _reference_share(hessian, gradient, 3)[0], atol=1e-10)
    with pytest.raises(ValueError, match="linearly dependent"):
        js.gradient_share(op, np.stack([top[0], 2 * top[0]]))
    with pytest.raises(ValueError, match=r"\(k, "):
        js.gradient_share(op, np.ones((2, op.dim + 1)))
    with pytest.raises(ValueError, match="shape"):
        js.gradient_share(op, top, gradient=np.ones(3))


@pytest.mark.slow  # the digits MLP's dense Hessian (2,410 parameters) takes a while
def test_gradient_share_on_the_digits_mlp_to_1e5(x64):
    """Issue 19's acceptance: the demo's model (trained briefly), full-batch and mini-batch
    gradients, against numpy.linalg.eigh of the dense float64 Hessian, to 1e-5."""
    from jax_spectral import datasets

    X, y = datasets.load_digits(np.float64)
    model = datasets.mlp()
    params = model.init(jax.random.key(0), X[:1])["params"]
    loss = datasets.cross_entropy_loss(model.apply)
    params = datasets.train_classifier(loss, params, (X, y), steps=50)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
    flat, unravel = ravel_pytree(params)
    hessian = np.asarray(jax.hessian(lambda f: loss(unravel(f), (X, y)))(flat))
    gradient = np.asarray(jax.grad(lambda f: loss(unravel(f), (X, y)))(flat))
    op = js.hessian_operator(loss, params, (X, y), batch_size=512)
    pairs = js.eigenpairs(op, jax.random.key(1), 10, order=120)
    assert np.all(pairs.converged)
    got = js.gradient_share(op, pairs, per_batch=True)
    want, values = _reference_share(hessian, gradient, 10)
    np.testing.assert_allclose(got.eigenvalues, values, rtol=1e-8)
    np.testing.assert_allclose(got.share, want, atol=1e-5)
    top = np.linalg.eigh(hessian)[1][:, ::-1][:, :10]
    for i, lo in enumerate(range(0, len(X), 512)):
        b = (X[lo : lo + 512], y[lo : lo + 512])
        g = np.asarray(jax.grad(lambda f, b=b: loss(unravel(f), b))(flat))
        np.testing.assert_allclose(
            got.batch_share[i], np.cumsum((top.T @ g) ** 2) / np.sum(g**2), atol=1e-5
        )


def _known_spectrum(dim=1000, outliers=(20.0, 30.0, 40.0, 50.0, 60.0)):
    rng = np.random.default_rng(0)
    bulk = np.sort(rng.gamma(2.0, 0.15, size=dim - len(outliers)))  # a skewed bulk near 0
    values = np.concatenate([bulk, outliers])
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    return values, basis


def test_deflated_slq_resolves_the_bulk(x64):
    """Issue 19's acceptance: L1 distance to the exact deflated density <= 0.05 at 10
    probes x 90 steps."""
    values, basis = _known_spectrum()
    dim, k = len(values), 5
    matrix = jnp.asarray((basis * values) @ basis.T)
    op = js.as_operator(lambda v, m: m @ v, matrix, dim=dim, dtype=jnp.float64)
    top = basis[:, -k:][:, ::-1].T  # the outliers' exact eigenvectors
    result = js.slq(op, jax.random.key(0), 90, num_probes=10, deflate=top)
    assert np.all(result.nodes.max(axis=1) < values[:-k].max() + 1e-6)  # no outlier left
    np.testing.assert_allclose(result.weights.sum(axis=1), 1.0, atol=1e-10)
    grid = np.linspace(values[0] - 0.2, values[-k - 1] + 0.2, 2000)
    sigma_squared = 2e-4
    got = js.spectral_density(result, grids=grid, sigma_squared=sigma_squared).density
    exact, _ = js.eigv_to_density(values[None, :-k], grids=grid, sigma_squared=sigma_squared)
    l1 = np.sum(np.abs(got - exact)) * (grid[1] - grid[0])
    assert l1 <= 0.05, l1
    # the same run without deflation spends nodes on the outliers and stretches the density
    plain = js.slq(op, jax.random.key(0), 90, num_probes=10)
    assert np.any(plain.nodes.max(axis=1) > 50)


def test_deflate_is_p_a_p_and_checks_its_vectors(x64):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((7, 7))
    a = a + a.T
    op = js.as_operator(lambda v, m: m @ v, jnp.asarray(a), dim=7, dtype=jnp.float64)
    v = rng.standard_normal((2, 7))
    q = np.linalg.qr(v.T)[0]
    p = np.eye(7) - q @ q.T
    deflated = js.deflate(op, v)
    eye = np.eye(7)
    np.testing.assert_allclose(np.stack([deflated.matvec(e) for e in eye]).T, p @ a @ p, atol=1e-12)
    np.testing.assert_allclose(deflated.matmat(jnp.asarray(eye)).T, p @ a @ p, atol=1e-12)
    with pytest.raises(ValueError, match="span only 1"):
        js.deflate(op, np.stack([v[0], 3 * v[0]]))
    with pytest.raises(ValueError, match=r"\(k, 7\)"):
        js.deflate(op, np.ones((2, 6)))


def test_log_abs_density_puts_each_sign_and_decade_where_it_belongs():
    nodes = np.array([[1e-9, 0.01, 0.1, 10.0, -0.5, -0.05]])
    weights = np.array([[0.1, 0.2, 0.2, 0.2, 0.2, 0.1]])
    got = js.density.log_abs_density(nodes, weights, sigma=0.02, grid_len=4000)
    du = got.grid[1] - got.grid[0]
    assert got.zero_mass == pytest.approx(0.1)  # 1e-9 is below the default floor 1e-5
    assert np.sum(got.positive) * du == pytest.approx(0.6, abs=1e-3)
    assert np.sum(got.negative) * du == pytest.approx(0.3, abs=1e-3)
    for part, where, mass in ((got.positive, -2.0, 0.2), (got.negative, np.log10(0.5), 0.2)):
        near = np.abs(got.grid - where) < 0.2  # the peak of one node, by itself
        assert np.sum(part[near]) * du == pytest.approx(mass, abs=1e-3)
    with pytest.raises(ValueError, match="zero"):
        js.density.log_abs_density(np.zeros((1, 3)))


def test_log_density_plot_renders_headless(tmp_path):
    pytest.importorskip("matplotlib")
    from jax_spectral.plot import plot_log_density

    values, _ = _known_spectrum(dim=200)
    values = np.concatenate([values, -values[:20] / 10])
    got = js.density.log_abs_density(values[None])
    fig = plot_log_density(got, title="log density", path=tmp_path / "log.png")
    assert (tmp_path / "log.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[0] == "λ > 0" and "λ < 0" in labels[1] and "%" in labels[2]


def test_review_cases_of_the_analyses(x64, tmp_path):
    """Degenerate inputs found by review: no complement to deflate into; a draw without
    weight; mass just above the log floor; a params-shaped gradient; NaN in records."""
    op = js.as_operator(lambda v: 2.0 * v, dim=3, dtype=jnp.float64)
    with pytest.raises(ValueError, match="no complement"):
        js.deflate(op, np.eye(3))
    nodes, weights = np.array([[0.5, 2.0], [1.0, 3.0]]), np.array([[0.5, 0.5], [0, 0]])
    got = js.density.log_abs_density(nodes, weights)
    assert np.all(np.isfinite(got.positive))
    nodes, weights = np.array([[1.0001e-6, 1.0]]), np.array([[0.5, 0.5]])
    near = js.density.log_abs_density(nodes, weights, grid_len=20000)
    du = near.grid[1] - near.grid[0]  # within three widths of the grid's ends: 0.999
    assert np.sum(near.positive) * du == pytest.approx(1.0, abs=2e-3)
    params = {"w": jnp.arange(1.0, 4.0)}
    H = js.hessian_operator(lambda p, b: jnp.sum(b * p["w"] ** 2), params, jnp.ones((4, 3)))
    rows = np.eye(3)[:2]
    tree = js.gradient_share(H, rows, gradient={"w": jnp.array([1.0, 0.0, 1.0])})
    np.testing.assert_allclose(tree.share, [0.5, 0.5])

    def curved(p, b):  # distinct curvatures: 8, 16, 24
        return jnp.sum(b * jnp.arange(1.0, 4.0) * p["w"] ** 2)

    zero = js.hessian_operator(curved, {"w": jnp.zeros(3)}, jnp.ones((4, 3)))
    record = js.training.record(tmp_path, 0, zero, jax.random.key(0), order=3, top_k=2)
    assert np.isnan(record["gradient_share"]).all()  # a zero gradient
    text = (tmp_path / "step_000000000.json").read_text()
    assert "NaN" not in text and "null" in text
    assert np.isnan(js.training.load(tmp_path)[0]["gradient_share"]).all()
    with pytest.raises(ValueError, match="top_k=5 is more"):
        js.training.record(tmp_path, 1, zero, jax.random.key(0), order=3, top_k=5)


def _diagonal_slq(values, order=60, probes=5, seed=0):
    d = jnp.asarray(values, jnp.float64)
    op = js.as_operator(lambda v: d * v, dim=len(values), dtype=jnp.float64)
    return js.slq(op, jax.random.key(seed), order, num_probes=probes)


def test_outliers_are_the_planted_ones(x64):
    """Known spectra: the planted outliers come back exactly, above and below, nested
    (one huge outlier above a group) included; a bulk without outliers gives none."""
    rng = np.random.default_rng(0)
    gamma = rng.gamma(2.0, 0.5, 995)
    normal = rng.normal(0.0, 1.0, 990)
    wishart = np.linalg.eigvalsh((lambda a: a.T @ a / 2000)(rng.standard_normal((2000, 600))))
    cases = [  # (bulk, upper outliers, lower outliers)
        (gamma, [60.0, 50.0, 40.0, 30.0, 20.0], []),
        (gamma, [1000.0, 12.0, 11.0, 10.5, 10.0], []),
        (normal, [110.0, 100.0, 90.0, 80.0, 60.0, 50.0, 45.0, 40.0], [-30.0, -25.0]),
        (wishart[:-3], [7.0, 6.0, 5.0], []),  # a Marchenko-Pastur bulk and three spikes
        (gamma, [], []),
        (wishart, [], []),
    ]
    for bulk, upper, lower in cases:
        values = np.concatenate([bulk, upper, lower])
        found = js.outliers(_diagonal_slq(values))
        np.testing.assert_allclose(found.upper, upper, rtol=1e-9)
        np.testing.assert_allclose(found.lower, lower, rtol=1e-9)
        # the bulk's edges as the Ritz values see them: inside the bulk, near its ends
        width = bulk.max() - bulk.min()
        assert bulk.max() - 0.02 * width <= found.bulk[1] <= bulk.max() + 1e-9
        assert bulk.min() - 1e-9 <= found.bulk[0] <= bulk.min() + 0.05 * width
        assert np.isfinite(found.upper_ratios[: max(len(upper), 1)]).all()
    # the same from a training record (a dict of nested lists, as JSON gives it back)
    result = _diagonal_slq(np.concatenate([gamma, [60.0, 50.0]]))
    record = {"nodes": result.nodes.tolist(), "weights": result.weights.tolist()}
    np.testing.assert_array_equal(js.outliers(record).upper, js.outliers(result).upper)


def test_outliers_ignore_a_tail_that_decays_into_a_dense_bulk(x64):
    """A trained network's shape without a gap: most eigenvalues at zero and a tail that
    thins out geometrically. The gaps near the dense spike are wide against their distance
    from the median (which is zero), so the first ratio alone would call the whole tail
    outliers; the probes do not agree on those Ritz values, and the spacing below the gaps
    is no narrower than the gaps, so none is one. Planting a group above a gap finds it."""
    rng = np.random.default_rng(2)
    spike = rng.normal(0.0, 1e-5, 1700)
    tail = 0.6 * 0.97 ** np.arange(200)  # 0.6 down to 0.0013 by a constant ratio
    found = js.outliers(_diagonal_slq(np.concatenate([spike, tail]), order=40, probes=4))
    assert len(found.upper) == 0 and len(found.lower) == 0, found
    group = np.array([9.0, 5.0, 4.0, 3.0, 2.5, 2.0, 1.6, 1.4, 0.9])
    found = js.outliers(_diagonal_slq(np.concatenate([spike, tail, group]), order=40, probes=4))
    np.testing.assert_allclose(found.upper, group, rtol=1e-9)


def test_outliers_check_their_input(x64):
    result = _diagonal_slq(np.linspace(0.0, 1.0, 50), order=10, probes=2)
    one = {"nodes": result.nodes[:1], "weights": result.weights[:1]}
    with pytest.raises(ValueError, match="at least two probes"):
        js.outliers(one)
    with pytest.raises(TypeError, match="SLQ result or a training record"):
        js.outliers(np.linspace(0.0, 1.0, 50))
    bad = {
        "nodes": np.where(np.eye(2, 10, dtype=bool), np.nan, result.nodes),
        "weights": result.weights,
    }
    with pytest.raises(ValueError, match="NaN"):
        js.outliers(bad)
    for kwargs in ({"min_gap": 0}, {"min_spacing": -1}, {"tol": np.inf}, {"max_fraction": 0}):
        with pytest.raises(ValueError):
            js.outliers(result, **kwargs)


def test_review_cases_of_outliers(x64):
    """An independent review found these wrong answers; each failed before its fix."""
    rng = np.random.default_rng(0)
    gamma = rng.gamma(2.0, 0.5, 1000)

    def found(values, dtype=jnp.float64):
        d = jnp.asarray(values, dtype)
        op = js.as_operator(lambda v: d * v, dim=len(values), dtype=dtype)
        return js.outliers(js.slq(op, jax.random.key(0), 60, num_probes=5))

    # a bulk seen by one or two nodes: the spacing below a gap was read across the median,
    # from the other side's outliers, and both sides' outliers went missing
    f = found(np.r_[np.zeros(1000), np.linspace(10.0, 100.0, 10), -5.0, -10.0, -20.0])
    np.testing.assert_allclose(f.upper, np.linspace(100.0, 10.0, 10), rtol=1e-9)
    np.testing.assert_allclose(f.lower, [-20.0, -10.0, -5.0], rtol=1e-9)
    f = found(np.r_[rng.normal(0.0, 1e-4, 1000), 100.0, 80.0, 60.0, -10.0, -5.0], jnp.float32)
    np.testing.assert_allclose(f.upper, [100.0, 80.0, 60.0], rtol=1e-6)
    np.testing.assert_allclose(f.lower, [-10.0, -5.0], rtol=1e-6)
    # one huge outlier made the probes' agreement tolerance (relative to the width) so
    # loose that unconverged Ritz values inside a cluster of 50 counted as outliers
    f = found(np.r_[gamma[:950], np.linspace(10.0, 11.0, 50), 1000.0])
    np.testing.assert_allclose(f.upper, [1000.0], rtol=1e-9)
    # a repeated outlier came back once per near-copy that the breakdown left
    np.testing.assert_allclose(found(np.r_[gamma[:996], 50.0, 50.0, 50.0, 40.0]).upper, [50, 40])
    # transposed nodes and weights were taken as probes
    result = _diagonal_slq(np.r_[gamma[:995], 20.0, 30.0])
    with pytest.raises(ValueError, match="transposed"):
        js.outliers({"nodes": result.nodes.T, "weights": result.weights.T})
