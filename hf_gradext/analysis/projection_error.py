"""How well projected gradients preserve dot products and cosines, as a function of dimension.

Why several metrics: raw dot products between per-sample gradients of a random (or barely trained)
model are close to zero relative to the gradient norms, so the *relative* RMSE of dot products divides by
a near-zero quantity and says little. The headline metric is therefore the dot-product error normalized
by the reference gradient norms, ``(<Pg_i, Pg_j> - <g_i, g_j>) / (|g_i| |g_j|)`` (the error on the
cosine scale, which for a JL projection shrinks like ``1/sqrt(D)``), next to the error of the projected
cosines themselves, the relative RMSE of dot products, and the relative error of squared norms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def pairwise_error_metrics(proj: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Error of pairwise dot products / cosines of ``proj`` rows against ``ref`` rows (same samples).

    Args:
        proj: (N, D) projected gradients. ref: (N, R) reference vectors (exact gradients, a higher-rank
            projection, ...), row i the same example as ``proj`` row i.

    Returns:
        ``normalized_dot_rmse`` (RMS over pairs i<j of the dot error divided by ``|g_i||g_j|``),
        ``cosine_rmse``, ``cosine_max_abs``, ``dot_relative_rmse``, ``sq_norm_relative_rmse`` and counts.
    """
    if proj.shape[0] != ref.shape[0] or proj.shape[0] < 2:
        raise ValueError(f"need the same N >= 2 rows, got {proj.shape[0]} and {ref.shape[0]}")
    p, r = proj.double(), ref.double()
    dot_hat, dot = p @ p.T, r @ r.T  # (N, N)
    norm_hat, norm = dot_hat.diagonal().clamp_min(0).sqrt(), dot.diagonal().clamp_min(0).sqrt()  # (N,)
    n = p.shape[0]
    pairs = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    scale = (norm[:, None] * norm[None, :]).clamp_min(1e-300)
    err = dot_hat - dot
    cos_hat = dot_hat / (norm_hat[:, None] * norm_hat[None, :]).clamp_min(1e-300)
    cos = dot / scale
    sq_rel = dot_hat.diagonal() / dot.diagonal().clamp_min(1e-300) - 1
    return {
        "normalized_dot_rmse": float((err / scale)[pairs].pow(2).mean().sqrt()),
        "cosine_rmse": float((cos_hat - cos)[pairs].pow(2).mean().sqrt()),
        "cosine_max_abs": float((cos_hat - cos)[pairs].abs().max()),
        "dot_relative_rmse": float(
            err[pairs].pow(2).mean().sqrt() / dot[pairs].pow(2).mean().sqrt().clamp_min(1e-300)
        ),
        "sq_norm_relative_rmse": float(sq_rel.pow(2).mean().sqrt()),
        "mean_abs_reference_cosine": float(cos[pairs].abs().mean()),
        "num_samples": n,
        "num_pairs": int(pairs.sum()),
    }


def dense_gaussian_projection(
    grads: torch.Tensor, dim: int, seed: int = 0, chunk: int = 1 << 16
) -> torch.Tensor:
    """TRAK-style baseline: ``grads @ R`` with R (P, dim) i.i.d. N(0, 1/dim), generated chunk by chunk.

    Args:
        grads: (N, P) materialized gradients. dim: target dimension. seed: CPU generator seed.

    Returns:
        (N, dim) float64.
    """
    gen = torch.Generator().manual_seed(seed)
    g = grads.double()
    out = torch.zeros(g.shape[0], dim, dtype=torch.float64)
    for start in range(0, g.shape[1], chunk):
        block = torch.randn(min(chunk, g.shape[1] - start), dim, generator=gen, dtype=torch.float64)
        out += g[:, start : start + block.shape[0]] @ block  # (N, dim)
    return out / math.sqrt(dim)


def plot_error_vs_dimension(
    curves: dict[str, list[tuple[int, float]]], path_base: str | Path, title: str
) -> list[Path]:
    """Log-log plot of error vs total dimension (one line per curve, with a ``1/sqrt(D)`` guide).

    Returns:
        The written PNG and PDF paths (``path_base`` + ``.png`` / ``.pdf``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    all_dims: list[int] = []
    for label, points in curves.items():
        pts = sorted((d, e) for d, e in points if e > 0)
        if pts:
            ax.plot([d for d, _ in pts], [e for _, e in pts], marker="o", label=label)
            all_dims += [d for d, _ in pts]
    first = next((sorted(p)[0] for p in curves.values() if p), None)
    if first and len(set(all_dims)) > 1:
        d0, e0 = first
        dims = sorted(set(all_dims))
        ax.plot(dims, [e0 * math.sqrt(d0 / d) for d in dims], "k:", label=r"$\propto 1/\sqrt{D}$")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("total projection dimension D")
    ax.set_ylabel("error")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths = []
    for ext in ("png", "pdf"):
        path = Path(f"{path_base}.{ext}")
        tmp = path.with_name(f".{path.name}.tmp.{ext}")
        fig.savefig(tmp)
        tmp.replace(path)
        paths.append(path)
    plt.close(fig)
    return paths


def summarize(results: Sequence[dict[str, Any]], metric: str) -> list[tuple[int, float]]:
    """``(dimension, metric)`` pairs from a list of per-dimension result dicts (each has ``dim``)."""
    return [(int(r["dim"]), float(r[metric])) for r in results]
