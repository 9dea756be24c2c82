"""The statistics and the report of attribution_lds.py: LDS per query, bootstrap intervals, the paired
difference to the best peer, and the PNGs redrawn from its CSV (definitions in attribution_lds.py's docstring).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch

KINDS = ("dot", "cosine", "damped")
TRAK_METHODS = ("dattri_trak", "traker")  # their own TRAK scores, not our scoring of their rows
PEERS_SCORED = ("bergson", "bergson_adam")  # peer representations scored by our dot / cosine / damped
UNSEEDED = ("exact", "adam_full")  # no projection


def lds(scores: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """Per-query Spearman over subsets of ``masks @ scores^T`` (M, Q) and ``-losses`` (M, Q)."""
    pred = masks.to(torch.float64) @ scores.T.to(torch.float64)  # (M, Q)

    def ranks(x):
        return x.argsort(dim=0).argsort(dim=0).to(torch.float64)

    a, b = ranks(pred), ranks(-losses.to(torch.float64))
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-30)  # (Q,)


def paired_difference(a: torch.Tensor, b: torch.Tensor, reps: int = 10_000) -> tuple[float, float, float]:
    """Mean and 95% interval of ``mean LDS(a) - mean LDS(b)`` on the same queries.

    ``a`` (S_a, Q) and ``b`` (S_b, Q): per-seed, per-query LDS of two methods. Two-level percentile
    bootstrap: the queries are resampled once per replicate for both (they are shared, which is what makes
    the difference sharper than the two intervals), each method's projection seeds independently (their
    draws are independent), so the interval holds both sources of noise.
    """
    gen = torch.Generator().manual_seed(1)
    q = a.shape[1]
    idx_q = torch.randint(0, q, (reps, q), generator=gen)  # (R, Q)

    def resampled(x: torch.Tensor) -> torch.Tensor:
        idx_s = torch.randint(0, x.shape[0], (reps, x.shape[0]), generator=gen)  # (R, S)
        per_query = x[idx_s].mean(dim=1)  # (R, Q): seed-resampled LDS of each query
        return per_query.gather(1, idx_q).mean(dim=1)  # (R,)

    diffs = resampled(a.double()) - resampled(b.double())
    point = float(a.double().mean() - b.double().mean())
    return point, float(diffs.quantile(0.025)), float(diffs.quantile(0.975))


def bootstrap(values: torch.Tensor, reps: int = 10_000) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(values), (reps, len(values)), generator=gen)
    means = values[idx].mean(dim=1)
    return float(means.quantile(0.025)), float(means.quantile(0.975))


def versus_best_peer(
    per_seed_lds: dict[tuple[str, str, int], torch.Tensor],
) -> dict[tuple[str, str, int], tuple[str, float, float, float]]:
    """``{(hf method, score, D): (best peer, difference, ci low, ci high)}`` for every projected hf method.

    The best peer at a D and score is the peer representation (``PEERS_SCORED``, scored by our code) with the
    highest mean LDS there; the difference is :func:`paired_difference` on the same queries.
    """
    out = {}
    for (method, kind, dim), stack in per_seed_lds.items():
        if method in PEERS_SCORED or method in TRAK_METHODS or method in UNSEEDED:
            continue
        peers = {
            m: v for (m, k, d), v in per_seed_lds.items() if m in PEERS_SCORED and k == kind and d == dim
        }
        if not peers:
            continue
        best = max(peers, key=lambda m: float(peers[m].mean()))
        out[(method, kind, dim)] = (best, *paired_difference(stack, peers[best]))
    return out


def table_from_csv(path: Path) -> tuple[list[tuple], str]:
    """The LDS table (method, kind, D, mean, lo, hi) and the title line, back from a written CSV."""

    values: dict[str, dict[str, float]] = {}
    title = ""
    with open(path, newline="") as handle:
        for r in csv.DictReader(handle):
            if r["metric"].startswith("lds_") and r["variant"].count("/") == 2:
                values.setdefault(r["variant"], {})[r["metric"]] = float(r["value"])
                config = json.loads(r["config"])
                title = (
                    f"attribution LDS, M={config['M']} subsets, N={config['N']}, {r['device']}, {r['date']}"
                )
    table = []
    for variant, v in values.items():
        method, kind, dim = variant.split("/")
        table.append((method, kind, int(dim[2:]), v["lds_mean"], v["lds_ci95_low"], v["lds_ci95_high"]))
    return table, title


def plot(csv_path: Path) -> Path | None:
    """LDS against D, one panel per score, one line per method (peers dashed), from the CSV."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    table, title = table_from_csv(csv_path)
    kinds = [k for k in ("dot", "cosine", "damped", "trak") if any(r[1] == k for r in table)]
    methods = sorted({r[0] for r in table})
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 4.2), sharey=True, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for j, method in enumerate(methods):
            pts = sorted((r[2], r[3], r[4], r[5]) for r in table if r[0] == method and r[1] == kind)
            if not pts:
                continue
            d, mean, lo, hi = (list(x) for x in zip(*pts))
            style = "--" if method.startswith(("bergson", "dattri", "traker")) else "-"
            if len(d) == 1 and method in UNSEEDED:  # full dimension: a reference level
                ax.axhspan(lo[0], hi[0], color=f"C{j % 10}", alpha=0.12)
                ax.axhline(mean[0], color=f"C{j % 10}", lw=1, label=f"{method} (D={d[0]:,})")
                continue
            yerr = [[m - a for m, a in zip(mean, lo)], [b - m for m, b in zip(mean, hi)]]
            ax.errorbar(
                d, mean, yerr=yerr, fmt="o" + style, color=f"C{j % 10}", capsize=2, ms=3, label=method
            )
        ax.set_xscale("log", base=2)
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("projection dimension D")
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=6, loc="lower right")
    axes[0][0].set_ylabel("LDS (mean over queries, 95% bootstrap CI)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(csv_path).with_suffix(".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    plot_paired(csv_path, plt)
    return path


def plot_paired(csv_path: Path, plt: Any) -> Path | None:
    """``<csv>_paired.png``: each hf_gradext method minus the best peer (paired, 95% CI) against D, per score."""

    diffs: dict[tuple[str, str], list[tuple[int, float, float, float, str]]] = {}
    with Path(csv_path).open() as handle:
        values = {(r["variant"], r["metric"]): float(r["value"]) for r in csv.DictReader(handle)}
    for (variant, metric), value in values.items():
        if not metric.startswith("lds_minus_") or metric.endswith(("_ci95_low", "_ci95_high")):
            continue
        method, kind, dim = variant.split("/")
        lo, hi = values[(variant, metric + "_ci95_low")], values[(variant, metric + "_ci95_high")]
        diffs.setdefault((kind, method), []).append(
            (int(dim[2:]), value, lo, hi, metric[len("lds_minus_") :])
        )
    kinds = [k for k in KINDS if any(key[0] == k for key in diffs)]
    if not kinds:
        return None
    methods = sorted({m for _, m in diffs})
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.6 * len(kinds), 4.2), sharey=True, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for j, method in enumerate(methods):
            pts = sorted(diffs.get((kind, method), []))
            if not pts:
                continue
            offset = 1 + 0.03 * (j - len(methods) / 2)  # spread the points of one D apart
            d = [p[0] * offset for p in pts]
            mean = [p[1] for p in pts]
            yerr = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
            ax.errorbar(
                d, mean, yerr=yerr, fmt="o-", color=f"C{j % 10}", capsize=2, ms=3, lw=0.8, label=method
            )
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{kind}: minus the best peer at that D (paired)", fontsize=9)
        ax.set_xlabel("projection dimension D")
        ax.legend(fontsize=6, loc="lower right")
    axes[0][0].set_ylabel("LDS difference (mean, 95% CI over queries and seeds)")
    fig.tight_layout()
    path = Path(csv_path).with_name(Path(csv_path).stem + "_paired.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
