"""Shared matplotlib helpers (Agg backend: no display needed).

Every figure gets a title that fits (wrapped to the figure width), axis labels with units, a labelled
colorbar, tick labels shown in full (the figure grows to hold the longest layer name), and a colour
scale that one outlier cannot flatten: values beyond robust percentiles are clipped (the colorbar
shows the clipping with arrows), and a wide positive range switches to a log scale.
"""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm, Normalize  # noqa: E402

# Tick labels are only readable up to this many per axis; beyond it every n-th one is shown.
MAX_TICKS = 60
# Robust colour range: the central part of the finite values (see robust_color_scale); positive values
# spanning more than LOG_RATIO (max / min) are drawn on a log scale.
CLIP_PERCENTILES = (1.0, 99.0)
LOG_RATIO = 30.0
_CHAR_INCHES = 0.075  # width of one tick-label character at font size 7
_TITLE_CHARS_PER_INCH = 11  # characters of a size-11 title per inch of figure width


@dataclass(frozen=True)
class ColorScale:
    """How values map to colours: the range, log or linear, and which ends were clipped."""

    vmin: float
    vmax: float
    log: bool
    clipped_low: bool
    clipped_high: bool

    def norm(self) -> Normalize:
        return LogNorm(self.vmin, self.vmax) if self.log else Normalize(self.vmin, self.vmax)

    @property
    def extend(self) -> str:
        """matplotlib's colorbar ``extend`` for the clipped ends."""
        return {(False, False): "neither", (True, False): "min", (False, True): "max"}.get(
            (self.clipped_low, self.clipped_high), "both"
        )


def robust_color_scale(matrix: np.ndarray, symmetric: bool = False) -> ColorScale:
    """A colour range for ``matrix`` that one outlier cannot flatten (module docstring).

    The range is the central :data:`CLIP_PERCENTILES` of the finite values, widened back to the data's
    own ends unless an end lies further beyond than the whole central range is wide (then it is clipped,
    and the colorbar marks it). Non-negative values spanning more than :data:`LOG_RATIO` are log-scaled.
    ``symmetric``: a diverging scale centred on 0 (similarities), never log.
    """
    finite = matrix[np.isfinite(matrix)].astype(np.float64)
    if finite.size == 0:
        return ColorScale(0.0, 1.0, False, False, False)
    positive = finite[finite > 0]
    log = not symmetric and positive.size == finite.size and positive.max() / positive.min() > LOG_RATIO
    values = np.log10(finite) if log else finite
    data_min, data_max = float(values.min()), float(values.max())
    low = float(np.percentile(values, CLIP_PERCENTILES[0], method="higher"))
    high = float(np.percentile(values, CLIP_PERCENTILES[1], method="lower"))
    span = max(high - low, 1e-12 * max(abs(high), 1.0))
    clip_low, clip_high = low - data_min > span, data_max - high > span
    low, high = (low if clip_low else data_min), (high if clip_high else data_max)
    if symmetric:
        bound = max(abs(low), abs(high)) or 1.0
        return ColorScale(-bound, bound, False, clip_low, clip_high)
    if high <= low:  # constant: any range shows it
        high = low + 1.0
    if log:
        return ColorScale(10.0**low, 10.0**high, True, clip_low, clip_high)
    return ColorScale(low, high, False, clip_low, clip_high)


def _tick_step(count: int) -> int:
    return max(1, -(-count // MAX_TICKS))


def _label_inches(labels: list[str] | None, count: int) -> float:
    if not labels:
        return 0.0
    shown = labels[:: _tick_step(count)]
    return _CHAR_INCHES * max(len(s) for s in shown)


def heatmap(
    matrix: np.ndarray,
    path: str | Path,
    title: str,
    xlabels: list[str] | None = None,
    ylabels: list[str] | None = None,
    cmap: str = "viridis",
    symmetric: bool = False,
    *,
    xlabel: str = "",
    ylabel: str = "",
    colorbar_label: str = "",
) -> Path:
    """Write ``matrix`` (rows x cols) as a PNG heatmap with a labelled colorbar; returns the path.

    Tick labels are written in full (every n-th one past :data:`MAX_TICKS`); the colour range is
    :func:`robust_color_scale`'s. The PNG appears under its final name only when complete.
    """
    path = Path(path)
    fig = heatmap_figure(
        matrix,
        title,
        xlabels,
        ylabels,
        cmap,
        symmetric,
        xlabel=xlabel,
        ylabel=ylabel,
        colorbar_label=colorbar_label,
    )
    save_figure(fig, path)
    return path


def heatmap_figure(
    matrix: np.ndarray,
    title: str,
    xlabels: list[str] | None = None,
    ylabels: list[str] | None = None,
    cmap: str = "viridis",
    symmetric: bool = False,
    *,
    xlabel: str = "",
    ylabel: str = "",
    colorbar_label: str = "",
):
    """The figure :func:`heatmap` saves (axes first, colorbar second); the caller closes it."""
    rows, cols = matrix.shape
    left = _label_inches(ylabels, rows)
    bottom = _label_inches(xlabels, cols)
    width = min(3.5 + left + 0.3 * cols, 24)
    height = min(2.5 + bottom + 0.22 * rows, 30)
    fig, ax = plt.subplots(figsize=(max(width, 6.0), max(height, 3.5)))
    scale = robust_color_scale(matrix, symmetric)
    image = ax.imshow(
        np.ma.masked_invalid(matrix), aspect="auto", cmap=cmap, interpolation="nearest", norm=scale.norm()
    )
    bar = fig.colorbar(image, ax=ax, extend=scale.extend)
    bar.set_label(colorbar_label + (" (log scale)" if scale.log else ""))
    if xlabels is not None:
        step = _tick_step(cols)
        ax.set_xticks(range(0, cols, step), xlabels[::step], rotation=90, fontsize=7)
    if ylabels is not None:
        step = _tick_step(rows)
        ax.set_yticks(range(0, rows, step), ylabels[::step], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    figure_width = fig.get_size_inches()[0]
    ax.set_title("\n".join(textwrap.wrap(title, int(figure_width * _TITLE_CHARS_PER_INCH)) or [""]))
    return fig


def save_figure(fig, path: str | Path, dpi: int = 110) -> None:
    """Save ``fig`` (cropped to everything drawn, so no label is cut) under ``path`` atomically; closes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)  # a killed run never leaves a half PNG under the final name
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
