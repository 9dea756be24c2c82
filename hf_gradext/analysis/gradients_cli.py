"""``hf-gradext analyze gradients DIR``: a per-layer table and PNG heatmaps of collected gradients."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from hf_gradext.analysis.gradients import (
    attention_summary,
    layer_statistics,
    load_gradients,
    norms_over_steps,
    similarity_matrix,
)
from hf_gradext.errors import UserFacingError

COLUMNS = ("n", "mean", "std", "min", "p50", "p90", "max", "spread")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf-gradext analyze gradients", description=__doc__)
    p.add_argument("directory", help="collection directory (--gradient_collection_dir of the run)")
    p.add_argument("--step", type=int, default=None, help="only this optimizer step (default: all)")
    p.add_argument(
        "--layers", default=None, help="groups (attn,mlp,embed,norm) and/or regexes on layer names"
    )
    p.add_argument("--similarity", choices=("cosine", "dot"), default="cosine", help="similarity kind")
    p.add_argument("--similarity-layer", default=None, help="one layer for the similarity (default: all)")
    p.add_argument("--out", default=None, help="where PNGs go (default: DIRECTORY/analysis)")
    p.add_argument("--no-plots", action="store_true", help="print the tables only")
    return p


def format_table(stats: dict[str, dict[str, float]], groups: dict[str, str]) -> str:
    """Fixed-width text table of per-layer norm statistics."""
    width = max([len("layer")] + [len(k) for k in stats])
    lines = [f"{'layer':<{width}}  {'group':<5}  " + "  ".join(f"{c:>10}" for c in COLUMNS)]
    for layer, row in stats.items():
        cells = "  ".join(f"{row.get(c, float('nan')):>10.4g}" for c in COLUMNS)
        lines.append(f"{layer:<{width}}  {groups.get(layer, ''):<5}  {cells}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        data = load_gradients(args.directory, step=args.step, layers=args.layers)
    except UserFacingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    steps = data.steps
    print(
        f"{len(data.samples)} samples, steps {steps[0]}..{steps[-1]} ({len(steps)}), {len(data.layers)} layers"
    )
    print(format_table(layer_statistics(data), data.groups))
    attn = attention_summary(data)
    qkv = {k: v for k, v in attn.items() if "q_norm_mean" in v}
    if qkv:
        print("\nc_attn split (mean per-sample norm, share of squared norm):")
        for layer, row in qkv.items():
            parts = "  ".join(f"{p}: {row[f'{p}_norm_mean']:.4g} ({row[f'{p}_sq_share']:.0%})" for p in "qkv")
            print(f"  {layer}  {parts}")
    if args.no_plots:
        return 0
    out = Path(args.out) if args.out else Path(args.directory) / "analysis"
    from hf_gradext.analysis.plots import heatmap
    from hf_gradext.store import ensure_writable_dir

    ensure_writable_dir(out, "--out")  # before the plots are computed

    layers, step_list, mat = norms_over_steps(data)
    written = [
        heatmap(
            mat.numpy(),
            out / "norms_over_steps.png",
            "Mean per-sample gradient norm per layer and training step",
            [str(s) for s in step_list],
            layers,
            xlabel="training step (optimizer steps)",
            ylabel="layer",
            colorbar_label="mean L2 norm of per-sample gradients",
        )
    ]
    if data.grads:
        try:
            sim = similarity_matrix(data, args.similarity, layer=args.similarity_layer, step=args.step)
        except UserFacingError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        labels = [f"{s['step']}:{s['example_id']}" for s in data.samples]
        if args.step is not None:
            labels = [lab for lab, s in zip(labels, data.samples) if s["step"] == args.step]
        which = args.similarity_layer or "all layers"
        written.append(
            heatmap(
                np.asarray(sim.numpy()),
                out / f"similarity_{args.similarity}.png",
                f"{args.similarity} similarity of per-sample gradients ({which})",
                labels,
                labels,
                cmap="RdBu_r",
                symmetric=True,
                xlabel="sample (step:example_id)",
                ylabel="sample (step:example_id)",
                colorbar_label=f"{args.similarity} similarity"
                + (" (-1 to 1)" if args.similarity == "cosine" else ""),
            )
        )
    else:
        print(
            "(no full gradients stored: similarity plot skipped; collect with --gradient_collection_save full)"
        )
    for path in written:
        print(f"wrote {path}")
    return 0
