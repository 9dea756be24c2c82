"""``hf-gradext analyze projection-error``: error of projected dot products / cosines vs total dimension.

Example (three ranks against exact gradients of the projected layers)::

    hf-gradext full-grads --max_samples 32 --layers projected --proj_metadata runs/r1024 --output_dir runs/fg
    hf-gradext analyze projection-error --proj_dirs runs/r64 runs/r256 runs/r1024 \\
        --reference_kind full_layers --reference_dir runs/fg --dense_baseline --output_dir runs/analysis

Reference kinds: ``projection`` (rows of another, usually higher-rank, projection directory), ``full``
(exact gradients of every parameter stored by ``full-grads``), ``full_layers`` (only the weights the
projections cover), ``naive`` (the exact gradients projected with the matrices rebuilt from each
directory's metadata.json: the error is then pure numerics, a consistency check).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from hf_gradext.analysis.projection_error import (
    dense_gaussian_projection,
    pairwise_error_metrics,
    plot_error_vs_dimension,
    summarize,
)
from hf_gradext.errors import UserFacingError

KINDS = ("projection", "full", "full_layers", "naive")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hf-gradext analyze projection-error", description=__doc__.split("\n")[0]
    )
    p.add_argument("--proj_dirs", nargs="+", required=True, help="projection directories (one per dimension)")
    p.add_argument("--reference_kind", choices=KINDS, required=True, help="what to compare against")
    p.add_argument(
        "--reference_dir", required=True, help="projection dir (projection) or full-grads dir (others)"
    )
    p.add_argument("--num_samples", type=int, default=50, help="examples (common ids, lowest first) to use")
    p.add_argument(
        "--dense_baseline",
        action="store_true",
        help="also project the exact gradients with a dense Gaussian (TRAK-style) at each dimension",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the dense Gaussian baseline")
    p.add_argument("--output_dir", default="projection_error", help="where JSON, PNG and PDF go")
    p.add_argument("--name", default="projection_error", help="file name stem")
    return p


def _rows_by_id(directory: str) -> tuple[dict[int, int], torch.Tensor, dict[str, Any]]:
    from hf_gradext.projection.io import load_projections

    rows, ids, meta = load_projections(directory, sort_by_id=False)
    if len(set(ids)) != len(ids):
        raise UserFacingError(
            f"{directory} has repeated example ids (a training run?); use a `project` directory"
        )
    return {e: i for i, e in enumerate(ids)}, rows, meta


def _layer_slices(
    full_meta: dict[str, Any], proj_meta: dict[str, Any], directory: str
) -> list[dict[str, Any]]:
    slices = []
    for layer in proj_meta["layers"]:
        sl = full_meta["param_slices"].get(layer["weight_name"])
        if sl is None:
            raise UserFacingError(
                f"the full-grads reference lacks {layer['weight_name']} projected in {directory}; "
                "recompute it with --layers all or --layers projected"
            )
        slices.append({**sl, **layer})
    return slices


def _projected_weights(meta: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    return sorted((b["weight_name"], tuple(b["original_shape"])) for b in meta["layers"])


def _check_same_layers(runs: list[tuple], reference: tuple[str, dict[str, Any]] | None) -> None:
    """Every directory must project the same weights: only the dimension may differ.

    Dot products of projections of different weight sets estimate different quantities, and
    comparing them would silently give a meaningless error curve.
    """
    first_dir, first_meta = runs[0][0], runs[0][3]
    expected = _projected_weights(first_meta)
    others = [(d, meta) for d, _, _, meta in runs[1:]] + ([reference] if reference is not None else [])
    for directory, meta in others:
        got = _projected_weights(meta)
        if got != expected:
            diff = sorted({n for n, _ in set(got) ^ set(expected)})[:3]
            raise UserFacingError(
                f"{directory} and {first_dir} project different weights (e.g. {', '.join(diff)}); "
                "compare directories that differ only in --proj_rank_total (same --proj_layers, "
                "--include_embeddings and model)"
            )


def analyze(args: argparse.Namespace) -> dict[str, Any]:
    from hf_gradext.projection.full_grads import load_full_grads
    from hf_gradext.projection.kronecker import naive_project
    from hf_gradext.projection.matrices import make_factors

    if args.num_samples < 2:
        raise UserFacingError("--num_samples must be >= 2 (errors are over pairs of examples)")
    runs = [(d, *_rows_by_id(d)) for d in args.proj_dirs]
    if args.reference_kind == "projection":
        ref_pos, ref_rows, ref_meta = _rows_by_id(args.reference_dir)
        full_meta = None
        _check_same_layers(runs, (args.reference_dir, ref_meta))
    else:
        _check_same_layers(runs, None)
        grads, ref_ids, full_meta = load_full_grads(args.reference_dir)
        ref_pos, ref_rows = {e: i for i, e in enumerate(ref_ids)}, grads
    common = set(ref_pos)
    for _, pos, _, _ in runs:
        common &= set(pos)
    ids = sorted(common)[: args.num_samples]
    if len(ids) < 2:
        raise UserFacingError(
            "fewer than 2 example ids are common to every directory; project the same examples"
        )
    ref = ref_rows[[ref_pos[e] for e in ids]].double()  # (N, R)
    results = []
    for directory, pos, rows, meta in runs:
        proj = rows[[pos[e] for e in ids]].double()  # (N, D)
        entry: dict[str, Any] = {
            "dir": str(directory),
            "dim": int(meta["total_proj_dim"]),
            "rank_total": meta["proj_rank_total"],
            "method": meta["proj_method"],
        }
        target = ref
        if args.reference_kind in ("full_layers", "naive"):
            slices = _layer_slices(full_meta, meta, directory)
            exact = torch.cat(
                [ref[:, s["start"] : s["end"]] for s in slices], dim=1
            )  # projected weights only
            if args.reference_kind == "naive":
                parts = []
                for s in slices:
                    p_in, p_out = make_factors(
                        s["name"],
                        s["d_in"],
                        s["d_out"],
                        s["k_i"],
                        s["k_o"],
                        meta["proj_seed"],
                        meta["proj_method"],
                    )
                    parts.append(
                        naive_project(
                            ref[:, s["start"] : s["end"]].reshape(-1, *s["shape"]), p_in, p_out, s["layout"]
                        )
                    )
                target = torch.cat(parts, dim=1)
                entry["max_abs_elementwise_error_rel"] = float(
                    (proj - target).abs().max() / target.abs().max()
                )
            else:
                target = exact
        entry.update(pairwise_error_metrics(proj, target))
        if args.dense_baseline and args.reference_kind != "projection":
            source = target if args.reference_kind != "naive" else exact
            dense = dense_gaussian_projection(source, entry["dim"], seed=args.seed)
            entry["dense_gaussian"] = pairwise_error_metrics(dense, source)
        results.append(entry)
    results.sort(key=lambda r: r["dim"])
    return {
        "reference_kind": args.reference_kind,
        "reference_dir": str(args.reference_dir),
        "example_ids": ids,
        "results": results,
    }


def main(argv: list[str]) -> int:
    from hf_gradext.projection.io import write_json_atomic
    from hf_gradext.store import disk_errors, ensure_writable_dir
    from hf_gradext.store.disk import probe_writable

    try:
        args = _parser().parse_args(argv)
        probe_writable(args.output_dir, "--output_dir")  # before the analysis, creating nothing
        report = analyze(args)
        out = ensure_writable_dir(args.output_dir, "--output_dir")
        write_json_atomic(out / f"{args.name}.json", report, flag="--output_dir")
    except UserFacingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    curves = {
        "dot error / (|g_i||g_j|)": summarize(report["results"], "normalized_dot_rmse"),
        "cosine RMSE": summarize(report["results"], "cosine_rmse"),
    }
    dense = [r for r in report["results"] if "dense_gaussian" in r]
    if dense:
        curves["dense Gaussian: dot error / (|g_i||g_j|)"] = [
            (r["dim"], r["dense_gaussian"]["normalized_dot_rmse"]) for r in dense
        ]
    with disk_errors(out, "--output_dir", "writing the plots to"):
        paths = plot_error_vs_dimension(
            curves, out / args.name, f"projection error vs dimension ({args.reference_kind})"
        )
    for r in report["results"]:
        print(
            f"D={r['dim']:>7}  dot err/|g||g| {r['normalized_dot_rmse']:.4g}  cosine RMSE {r['cosine_rmse']:.4g}"
        )
    print("wrote " + ", ".join(str(p) for p in [out / f"{args.name}.json", *paths]))
    return 0
