"""Shared matplotlib helpers (Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def heatmap(
    matrix: np.ndarray,
    path: str | Path,
    title: str,
    xlabels: list[str] | None = None,
    ylabels: list[str] | None = None,
    cmap: str = "viridis",
    symmetric: bool = False,
) -> Path:
    """Write ``matrix`` as a PNG heatmap with a colorbar; returns the path."""
    path = Path(path)
    rows, cols = matrix.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.35 * cols, 16), min(2 + 0.25 * rows, 20)))
    kwargs = {}
    if symmetric:
        bound = float(np.nanmax(np.abs(matrix))) if matrix.size else 1.0
        kwargs = {"vmin": -bound, "vmax": bound}
    image = ax.imshow(matrix, aspect="auto", cmap=cmap, interpolation="nearest", **kwargs)
    fig.colorbar(image, ax=ax)
    if xlabels is not None and len(xlabels) <= 60:
        ax.set_xticks(range(cols), xlabels, rotation=90, fontsize=7)
    if ylabels is not None and len(ylabels) <= 80:
        ax.set_yticks(range(rows), ylabels, fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
