import os

import jax
import numpy as np
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
matplotlib = pytest.importorskip("matplotlib")

from jax_spectral import hessian_operator, tridiag_to_density  # noqa: E402
from jax_spectral.plot import plot_density, plot_eigenvalues  # noqa: E402
from jax_spectral.slq import slq, spectral_density  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _spectrum():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6)).astype(np.float32)
    y = rng.standard_normal(40).astype(np.float32)
    op = hessian_operator(
        lambda w, b: ((b[0] @ w - b[1]) ** 2).mean(), np.zeros(6, np.float32), (x, y)
    )
    return slq(op, jax.random.key(0), num_probes=3, order=6)


def test_density_plot_renders_headless(tmp_path):
    result = _spectrum()
    dens = spectral_density(result, sigma_squared=1e-3, grid_len=500)
    top = np.sort(result.nodes[0])[-2:]
    fig = plot_density(dens, outliers=top, path=tmp_path / "density.png", title="test")
    data = (tmp_path / "density.png").read_bytes()
    assert data.startswith(PNG) and len(data) > 5000
    (ax,) = fig.axes
    assert ax.get_yscale() == "log" and ax.get_ylim()[0] == pytest.approx(1e-10)
    assert len([line for line in ax.lines if line.get_linestyle() == "--"]) == 2
    assert len(ax.collections) == 1  # the standard-error band
    plot_density(tridiag_to_density(result.lanczos.tridiag, 1e-3, 500), path=tmp_path / "d.pdf")
    assert (tmp_path / "d.pdf").read_bytes().startswith(b"%PDF")
    # Written under a temporary name and renamed: only the two figures are left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.pdf", "density.png"]
    matplotlib.pyplot.close("all")


def test_eigenvalue_plot(tmp_path):
    fig = plot_eigenvalues([3.0, -1.0, 2.0], path=tmp_path / "eig.png")
    assert (tmp_path / "eig.png").read_bytes().startswith(PNG)
    np.testing.assert_array_equal(fig.axes[0].lines[0].get_ydata(), [3.0, 2.0, -1.0])
    matplotlib.pyplot.close("all")


def test_the_density_figure_shows_whole_peaks_and_its_settings(tmp_path):
    """The demo's bulk peak (density 121) was cut at a fixed ylim of 1e2, the grid ended
    0.01 past the extreme nodes (an edge peak cut mid-rise), the legend covered the lines
    and nothing said which settings made the figure."""
    from jax_spectral.slq import EDGE_WIDTHS

    result = _spectrum()
    sigma_squared = 1e-3
    dens = spectral_density(result, sigma_squared=sigma_squared, grid_len=2000)
    nodes = result.nodes[result.weights > 0]
    width = np.sqrt(sigma_squared * (dens.grid[-1] - dens.grid[0]))  # the kernel's sigma
    assert nodes.min() - dens.grid[0] >= (EDGE_WIDTHS - 0.5) * width
    assert dens.grid[-1] - nodes.max() >= (EDGE_WIDTHS - 0.5) * width
    assert dens.density[0] < 1e-3 * dens.density.max()  # the edge peaks end on the grid
    assert dens.density[-1] < 1e-3 * dens.density.max()
    sharp = dens._replace(density=dens.density * 500.0)  # a peak far above 1e2
    fig = plot_density(sharp, outliers=[nodes.max()], note="sigma^2 = 0.001, 3 probes x 6")
    (ax,) = fig.axes
    assert ax.get_ylim()[1] >= np.max(sharp.density + sharp.stderr)
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1  # outside the axes, off the data
    assert any("sigma^2 = 0.001" in t.get_text() for t in ax.texts)
    fig.savefig(tmp_path / "f.png", bbox_inches="tight")  # the note and legend fit the file
    matplotlib.pyplot.close("all")


def test_the_original_pair_is_checked_not_guessed(tmp_path):
    """plot_density took any pair as (density, grid): a (grid, density) pair was drawn
    with the axes swapped, without a word."""
    from jax_spectral import SpectralDensity

    density, grid = tridiag_to_density(np.diag([1.0, 2.0, 4.0])[None], 1e-3, 300)
    as_type = SpectralDensity.of((density, grid))
    assert np.array_equal(as_type.grid, grid) and as_type.stderr is None
    with pytest.raises(ValueError, match="strictly increasing 1-D grid second"):
        plot_density((grid, density))
    with pytest.raises(TypeError, match="expected a SpectralDensity"):
        plot_density(3.0)
    plot_density((density, grid), path=tmp_path / "pair.png")  # the original order draws
    assert (tmp_path / "pair.png").exists()


def test_density_types_with_lists_and_other_named_fields(tmp_path):
    import collections

    from jax_spectral import SpectralDensity
    from jax_spectral.plot import plot_densities

    density, grid = tridiag_to_density(np.diag([1.0, 2.0])[None], 1e-3, 200)
    listed = SpectralDensity(list(grid), list(density), None)
    other = collections.namedtuple("Other", "grid density stderr")(grid, density, None)
    plot_densities({"lists": listed, "other": other}, path=tmp_path / "panels")  # no suffix
    assert (tmp_path / "panels").read_bytes().startswith(PNG)
    plot_density(other, path=tmp_path / "other.png")
