import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_spectral import density as js_density
from jax_spectral import eigv_to_density, lanczos, tridiag_to_density, tridiag_to_eigv


def _spacing(grid):
    return grid[1] - grid[0]


def test_hand_computed_case_uses_the_original_formula():
    nodes = np.array([[0.0, 1.0]])
    weights = np.array([[0.25, 0.75]])
    grid = np.linspace(-1.0, 2.0, 61)
    sigma_squared = 0.1
    density, out_grid = eigv_to_density(nodes, weights, grids=grid, sigma_squared=sigma_squared)
    np.testing.assert_array_equal(out_grid, grid)
    # By hand: variance = 0.1 * max(1, 3) = 0.3, a weighted sum of two normal pdfs,
    # normalised so that sum(density) * spacing = 1.
    var = 0.3
    raw = []
    for g in grid:
        raw.append(
            0.25 * math.exp(-((g - 0.0) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var)
            + 0.75 * math.exp(-((g - 1.0) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var)
        )
    raw = np.array(raw)
    want = raw / (raw.sum() * 0.05)
    np.testing.assert_allclose(density, want, rtol=1e-12)


def test_default_grid_spans_every_node_of_every_draw():
    nodes = np.array([[0.0, 1.0, 2.0], [-3.0, 1.0, 5.0]])
    density, grid = eigv_to_density(nodes, grid_len=501)
    assert grid[0] == pytest.approx(-3.0 - 1e-2) and grid[-1] == pytest.approx(5.0 + 1e-2)
    assert np.all(density >= 0)
    assert np.sum(density) * _spacing(grid) == pytest.approx(1.0, rel=1e-12)


def test_zero_weight_padding_does_not_stretch_the_grid():
    nodes = np.array([[0.0, 0.0, 4.0, 6.0]])
    weights = np.array([[0.0, 0.0, 0.5, 0.5]])
    _, grid = eigv_to_density(nodes, weights, grid_len=100)
    assert grid[0] == pytest.approx(4.0 - 1e-2)


def test_narrow_kernel_keeps_every_spike():
    """Range 1e4 with sigma_squared 1e-5: the kernel (std 0.32) is narrower than the grid."""
    nodes = np.array([[0.0, 3333.3, 10000.0]])
    weights = np.array([[0.5, 0.2, 0.3]])
    grid = np.linspace(-20.0, 10020.0, 10000)  # keep the end nodes' tails inside the grid
    density, grid = eigv_to_density(nodes, weights, grids=grid, sigma_squared=1e-5)
    assert np.all(density >= 0)
    dx = _spacing(grid)
    assert np.sum(density) * dx == pytest.approx(1.0, rel=1e-12)
    for node, weight in zip(nodes[0], weights[0], strict=True):
        near = np.abs(grid - node) < 3 * dx
        assert np.sum(density[near]) * dx == pytest.approx(weight, rel=1e-6)


def test_explicit_grid_sets_the_bandwidth():
    grid = np.linspace(-10, 10, 2001)
    d1, _ = eigv_to_density(np.array([[0.0, 2.0]]), grids=grid, sigma_squared=1e-3)
    d2, _ = eigv_to_density(np.array([[0.0, 8.0]]), grids=grid, sigma_squared=1e-3)
    # Same grid, same kernel: the peak at 0 has the same height in both (the original
    # package took the width from the nodes' range, 2 or 8, and the peaks differed).
    i0 = np.argmin(np.abs(grid))
    assert d1[i0] == pytest.approx(d2[i0], rel=1e-9)


def test_tridiag_to_eigv_nodes_and_weights(x64):
    t = np.diag([1.0, 2.0, 3.0]) + np.diag([0.5, 0.25], 1) + np.diag([0.5, 0.25], -1)
    nodes, weights = tridiag_to_eigv([t, 2 * t])
    evals, evecs = np.linalg.eigh(t)
    np.testing.assert_allclose(nodes[0], evals)
    np.testing.assert_allclose(nodes[1], 2 * evals)
    np.testing.assert_allclose(weights[0], evecs[0] ** 2)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)
    assert nodes.dtype == weights.dtype == np.float64


def test_probes_at_full_order_give_the_exact_density(x64):
    n = 15
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float64)
    a = (a + a.T) / 2
    exact = np.linalg.eigvalsh(np.asarray(a))
    keys = jax.random.split(jax.random.key(1), 5)
    tridiags = np.stack([np.asarray(lanczos(lambda v: a @ v, k, n, dim=n).tridiag) for k in keys])
    sigma_squared = 1e-2
    density, grid = tridiag_to_density(tridiags, sigma_squared=sigma_squared, grid_len=1000)
    exact_density, _ = eigv_to_density(exact[None], grids=grid, sigma_squared=sigma_squared)
    # At full order each probe's rule is the exact eigenvalues weighted by the squared
    # projections of its start vector on the eigenvectors (NumPy's eigh): the density of
    # those is the estimate, to rounding.
    _, vectors = np.linalg.eigh(np.asarray(a))
    starts = np.stack([np.asarray(lanczos(lambda v: a @ v, k, 1, dim=n).basis[0]) for k in keys])
    weights = (starts @ vectors) ** 2
    nodes = np.broadcast_to(exact, weights.shape)
    expected, _ = eigv_to_density(nodes, weights, grids=grid, sigma_squared=sigma_squared)
    np.testing.assert_allclose(density, expected, rtol=1e-6, atol=1e-9)
    # ... and it estimates the exact density (five probes: a loose, statistical check).
    np.testing.assert_allclose(density, exact_density, atol=0.5, rtol=1e-1)
    # At order = dim every probe's nodes are the exact eigenvalues; with equal weights the
    # density is exact to rounding.
    nodes, _ = tridiag_to_eigv(tridiags)
    np.testing.assert_allclose(nodes, np.broadcast_to(exact, nodes.shape), atol=1e-10)
    equal, _ = eigv_to_density(nodes, grids=grid, sigma_squared=sigma_squared)
    np.testing.assert_allclose(equal, exact_density, rtol=1e-8, atol=1e-12)


def test_nan_anywhere_is_rejected():
    nodes = np.array([[0.0, 1.0], [2.0, np.nan]])  # the original only looked at [i, 0]
    with pytest.raises(ValueError, match="NaN or Inf"):
        eigv_to_density(nodes)
    with pytest.raises(ValueError, match="NaN or Inf"):
        eigv_to_density(np.array([[0.0, 1.0]]), np.array([[0.5, np.nan]]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        tridiag_to_eigv(np.full((2, 2), np.nan))


def test_bad_shapes_and_grids():
    with pytest.raises(ValueError, match="all_weights has shape"):
        eigv_to_density(np.zeros((2, 3)), np.ones((2, 2)))
    with pytest.raises(ValueError, match="increasing"):
        eigv_to_density(np.zeros((1, 3)), grids=np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="grid_len"):
        eigv_to_density(np.zeros((1, 3)), grid_len=1)
    with pytest.raises(ValueError, match="sigma_squared must be positive"):
        eigv_to_density(np.zeros((1, 3)), sigma_squared=0.0)
    with pytest.raises(ValueError, match="expected tridiagonals"):
        tridiag_to_eigv(np.zeros((2, 3)))


def test_degenerate_inputs():
    with pytest.raises(ValueError, match="no node has positive weight"):
        eigv_to_density(np.array([[1.0, 2.0]]), np.array([[0.0, 0.0]]))
    with pytest.raises(ValueError, match="the density vanishes on the grid"):
        eigv_to_density(np.array([[0.0]]), grids=np.linspace(1e6, 1e6 + 1, 5), sigma_squared=1e-9)


# -- matching other tools' kernels: each tool's density written out from its own procedure


def _gauss(x, mean, var):
    return np.exp(-((x - mean) ** 2) / (2 * var)) / np.sqrt(2 * np.pi * var)


def _pyhessian_density(nodes, weights, num_bins=3000, sigma_squared=1e-5, overhead=0.01):
    lmax = np.mean(np.max(nodes, axis=1)) + overhead
    lmin = np.mean(np.min(nodes, axis=1)) - overhead
    grid = np.linspace(lmin, lmax, num_bins)
    var = sigma_squared * max(1, lmax - lmin)
    per_draw = [
        [np.sum(_gauss(n, x, var) * w) for x in grid] for n, w in zip(nodes, weights, strict=True)
    ]
    out = np.mean(per_draw, axis=0)
    return grid, out


def _curvlinops_density(nodes, weights, num_points=3000, kappa=3.0, margin=0.05):
    lo, hi = nodes.min(), nodes.max()
    lo, hi = lo - margin * (hi - lo), hi + margin * (hi - lo)
    c, d = (hi + lo) / 2, (hi - lo) / 2
    grid_n = np.linspace(-1, 1, num_points)
    sigma_n = 2 / (nodes.shape[1] - 1) / np.sqrt(8 * np.log(kappa))
    per_draw = [
        (w / d) @ _gauss(grid_n[None], ((n - c) / d)[:, None], sigma_n**2)
        for n, w in zip(nodes, weights, strict=True)
    ]
    dens = np.mean(per_draw, axis=0)
    return np.linspace(lo, hi, num_points), dens


def _eigenthings_density(nodes, weights, num_points=3000, padding=0.1):
    lo, hi = nodes.min(), nodes.max()
    sigma = (hi - lo) / nodes.shape[1]
    grid = np.linspace(lo - padding * (hi - lo), hi + padding * (hi - lo), num_points)
    per_draw = [
        w @ _gauss(grid[None], n[:, None], sigma**2) for n, w in zip(nodes, weights, strict=True)
    ]
    dens = np.mean(per_draw, axis=0)
    return grid, dens


@pytest.mark.parametrize(
    "convention, reference",
    [
        ("pyhessian", _pyhessian_density),
        ("curvlinops", _curvlinops_density),
        ("eigenthings", _eigenthings_density),
    ],
)
def test_matching_sigma_squared_reproduces_other_tools_kernels(convention, reference):
    rng = np.random.default_rng(3)
    t = rng.standard_normal((3, 12, 12))
    nodes, weights = tridiag_to_eigv(5 * (t + t.transpose(0, 2, 1)))  # spans about 60
    grid, theirs = reference(nodes, weights)
    s2 = js_density.matching_sigma_squared(convention, nodes, weights, grids=grid)
    ours, _ = eigv_to_density(nodes, weights, grids=grid, sigma_squared=s2)
    dx = grid[1] - grid[0]
    np.testing.assert_allclose(ours, theirs / (theirs.sum() * dx), rtol=1e-6, atol=1e-12)
    plain, _ = eigv_to_density(nodes, weights, grids=grid)
    if convention == "pyhessian":  # same formula: on PyHessian's grid nothing changes
        np.testing.assert_allclose(plain, ours, rtol=1e-12)
    else:  # the conventions really differ: the default sigma_squared does not match
        assert np.max(np.abs(plain - ours)) > 0.1 * ours.max()


def test_original_convention_and_bad_names():
    nodes = np.array([[0.0, 2.0, 30.0], [1.0, 3.0, 20.0]])
    # The original: grid from the mean of per-draw extremes, widened by grid_expand.
    expected = 1e-3 * ((25.0 - 0.5) + 2e-2)
    assert js_density.kernel_variance("spectral_density", nodes, sigma_squared=1e-3) == (
        pytest.approx(expected)
    )
    with pytest.raises(ValueError, match="convention must be one of"):
        js_density.kernel_variance("torch", nodes)


@pytest.mark.parametrize(
    "convention", ["spectral_density", "pyhessian", "curvlinops", "eigenthings"]
)
def test_breakdown_padding_does_not_change_the_kernel(convention):
    nodes = np.array([[3.0, 7.0, 20.0, 0.0, 0.0], [4.0, 9.0, 25.0, 30.0, 0.0]])
    weights = np.array([[0.2, 0.3, 0.5, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4, 0.0]])
    padded = js_density.kernel_variance(convention, nodes, weights)
    shifted = np.where(weights > 0, nodes, 12.0)  # padding moved inside the range
    assert padded == pytest.approx(js_density.kernel_variance(convention, shifted, weights))
