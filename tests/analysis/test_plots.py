"""Plots: robust colour scales, full labels, titles that fit, atomic PNGs."""

from __future__ import annotations

import numpy as np
import pytest

from hf_gradext.analysis.plots import (
    MAX_TICKS,
    heatmap,
    heatmap_figure,
    plt,
    robust_color_scale,
    save_figure,
)

LLAMA_LAYERS = [
    f"model.layers.{i}.{part}"
    for i in range(4)
    for part in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.down_proj")
]


def test_one_outlier_does_not_flatten_the_rest():
    rng = np.random.default_rng(0)
    matrix = rng.uniform(1.0, 2.0, size=(16, 8))
    matrix[3, 4] = 1e4  # one exploding norm
    scale = robust_color_scale(matrix)
    assert scale.log  # four decades: log scale
    rest = np.delete(matrix.ravel(), 3 * 8 + 4)
    # The other cells use most of the colour range (flattened, they would sit in its bottom 1e-4).
    spread = scale.norm()(rest.max()) - scale.norm()(rest.min())
    assert spread > 0.5


def test_linear_outlier_is_clipped_and_marked():
    matrix = np.linspace(1.0, 2.0, 200).reshape(20, 10)
    matrix[0, 0] = 8.0  # within LOG_RATIO of the rest: linear, but far beyond the central range
    scale = robust_color_scale(matrix)
    assert not scale.log and scale.clipped_high and scale.extend == "max"
    assert scale.vmax < 2.1 and scale.vmin == pytest.approx(1.0, abs=0.01)


def test_unremarkable_data_keeps_its_full_range():
    matrix = np.arange(12, dtype=float).reshape(3, 4) + 1.0
    scale = robust_color_scale(matrix)
    assert (scale.vmin, scale.vmax, scale.log, scale.extend) == (1.0, 12.0, False, "neither")


def test_symmetric_scale_is_centred_and_never_log():
    matrix = np.array([[1.0, -0.2], [0.5, 0.9]])
    scale = robust_color_scale(matrix, symmetric=True)
    assert not scale.log and scale.vmin == -scale.vmax == -1.0


def test_constant_nan_and_empty_matrices():
    assert robust_color_scale(np.full((2, 2), 3.0)).vmax > 3.0
    assert robust_color_scale(np.full((2, 2), np.nan)) == robust_color_scale(np.zeros((0, 3)))
    with_nan = np.array([[1.0, np.nan], [2.0, 3.0]])
    assert robust_color_scale(with_nan).vmax == 3.0


def test_heatmap_labels_are_full_and_title_fits():
    matrix = np.random.default_rng(1).uniform(0.1, 1.0, size=(len(LLAMA_LAYERS), 3))
    title = "Mean per-sample gradient norm per layer and training step, a title long enough to wrap"
    fig = heatmap_figure(
        matrix,
        title,
        ["1", "2", "3"],
        LLAMA_LAYERS,
        xlabel="training step",
        ylabel="layer",
        colorbar_label="mean L2 norm",
    )
    try:
        ax, bar_ax = fig.axes
        assert [t.get_text() for t in ax.get_yticklabels()] == LLAMA_LAYERS
        assert ax.get_xlabel() == "training step" and ax.get_ylabel() == "layer"
        assert bar_ax.get_ylabel().startswith("mean L2 norm")
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        assert ax.title.get_window_extent(renderer).width <= fig.bbox.width
        assert " ".join(ax.get_title().split()) == title
    finally:
        plt.close(fig)


def test_many_ticks_are_thinned_not_dropped():
    rows = 3 * MAX_TICKS
    labels = [f"layer.{i}" for i in range(rows)]
    fig = heatmap_figure(np.ones((rows, 2)), "t", None, labels)
    try:
        shown = [t.get_text() for t in fig.axes[0].get_yticklabels()]
        assert 0 < len(shown) <= MAX_TICKS and shown[0] == "layer.0" and shown[1] == "layer.3"
    finally:
        plt.close(fig)


def test_heatmap_writes_a_png_and_no_temp_file(tmp_path):
    path = heatmap(np.eye(3), tmp_path / "sub" / "m.png", "identity", xlabel="x", ylabel="y")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.png"]


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    fig, _ = plt.subplots()

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fig, "savefig", boom)
    with pytest.raises(OSError):
        save_figure(fig, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []
