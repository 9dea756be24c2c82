"""Data attribution from projected gradients: top-K training examples for each query example.

Scores, for a training row ``x`` and a query row ``q`` (both projected gradients, same projection):

* ``dot``:    ``x . M q``;
* ``cosine``: ``x^ . M q^`` with ``x^ = x / |x|`` and ``q^ = q / |q|``;

where ``M = I`` by default, or with ``damping=lam`` the damped inverse of the training rows' second-moment
matrix, ``M = (F + lam * tr(F)/D * I)^-1`` with ``F = (1/N) sum_n x_n x_n^T`` (``lam`` is relative to the
mean eigenvalue so it does not depend on the gradient scale). For ``cosine`` ``F`` is built from the
normalized rows. The training rows are streamed block by block (memory-mapped shards): only one block,
the ``D x D`` matrix and the running top-K are in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

KINDS = ("cosine", "dot")
Blocks = Callable[[], Iterable[tuple[torch.Tensor, list[dict[str, Any]]]]]


def _prep(rows: torch.Tensor, kind: str) -> torch.Tensor:
    x = rows.to(torch.float64)
    if kind == "cosine":
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return x


def second_moment(blocks: Blocks, kind: str) -> tuple[torch.Tensor, int]:
    """``(F, N)``: the (D, D) mean outer product of the (normalized for cosine) training rows."""
    total: torch.Tensor | None = None
    count = 0
    for rows, _ in blocks():
        x = _prep(rows, kind)  # (n, D)
        total = x.T @ x if total is None else total + x.T @ x
        count += x.shape[0]
    if total is None or count == 0:
        raise ValueError("no training rows")
    return total / count, count


def top_k_attribution(
    blocks: Blocks,
    queries: torch.Tensor,
    top_k: int,
    kind: str = "cosine",
    damping: float | None = None,
) -> tuple[torch.Tensor, list[list[dict[str, Any]]]]:
    """Top-K training rows for each query.

    Args:
        blocks: a function returning an iterable of ``(rows (n, D), index rows)`` over the training set
            (called twice when ``damping`` is set).
        queries: (Q, D) query rows.
        top_k: K. kind: ``"cosine"`` or ``"dot"``. damping: see the module doc; None = no preconditioner.

    Returns:
        ``(scores (Q, K'), index)`` with ``K' = min(K, N)``, scores descending, and ``index[q][j]`` the
        training index row (``example_id``, ``snippet``, ...) of the j-th best match of query q.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    q = _prep(queries, kind)  # (Q, D)
    if damping is not None:
        f, _ = second_moment(blocks, kind)
        lam = damping * float(f.diagonal().mean())
        q = torch.linalg.solve(f + lam * torch.eye(f.shape[0], dtype=f.dtype), q.T).T  # (Q, D) = (M q^T)^T
    best_scores = torch.empty(q.shape[0], 0, dtype=torch.float64)  # (Q, k)
    best_rows: list[dict[str, Any]] = []
    best_pos = torch.empty(q.shape[0], 0, dtype=torch.long)  # (Q, k) positions into best_rows
    for rows, index in blocks():
        scores = q @ _prep(rows, kind).T  # (Q, n)
        offset = len(best_rows)
        best_rows.extend(index)
        cand_scores = torch.cat([best_scores, scores], dim=1)
        cand_pos = torch.cat(
            [best_pos, torch.arange(offset, offset + len(index)).expand(q.shape[0], -1)], dim=1
        )
        k = min(top_k, cand_scores.shape[1])
        best_scores, sel = cand_scores.topk(k, dim=1)
        best_pos = cand_pos.gather(1, sel)
        # Drop index rows no query keeps, so memory stays O(Q * K) and not O(N).
        keep = torch.unique(best_pos)
        remap = torch.full((len(best_rows),), -1, dtype=torch.long)
        remap[keep] = torch.arange(len(keep))
        best_rows = [best_rows[i] for i in keep.tolist()]
        best_pos = remap[best_pos]
    return best_scores, [[best_rows[i] for i in row] for row in best_pos.tolist()]


def _preconditioning_key(meta: dict[str, Any]) -> tuple | None:
    pre = meta.get("preconditioning")
    if not isinstance(pre, dict):
        return None
    return (pre.get("state_sha256"), pre.get("mode"), pre.get("power"), pre.get("eps"))


def _describe(meta: dict[str, Any]) -> str:
    pre = meta.get("preconditioning")
    if not isinstance(pre, dict):
        return "no --proj_precondition"
    sha = str(pre.get("state_sha256", ""))[7:19]
    return f"{pre.get('source')} (mode {pre.get('mode')}, power {pre.get('power')}, state {sha})"


def check_same_preconditioning(
    train_meta: dict[str, Any], query_meta: dict[str, Any], train: Any, query: Any
) -> None:
    """Refuse train and query rows preconditioned differently (another state, mode, power, or only one side).

    The same ``--proj_precondition_power 0.5`` on both sides gives Adam's ``g_q . s . g_i`` as dot score.
    """
    if _preconditioning_key(train_meta) != _preconditioning_key(query_meta):
        from hf_gradext.errors import UserFacingError

        raise UserFacingError(
            f"--train {train} was projected with {_describe(train_meta)}, --query {query} with "
            f"{_describe(query_meta)}; project both with the same --proj_precondition, "
            "--proj_precondition_mode and --proj_precondition_power"
        )


def run_attribution(args: Any) -> list[Any]:
    """``hf-gradext attribute``: read both projection dirs, score, write ``<output>.json`` and ``.csv``.

    Returns:
        The written paths.
    """
    import csv
    from pathlib import Path

    from hf_gradext.errors import UserFacingError
    from hf_gradext.projection.io import iter_projection_blocks, read_metadata, write_json_atomic

    train_meta, query_meta = read_metadata(args.train), read_metadata(args.query)
    keys = ("proj_seed", "proj_method", "layers", "total_proj_dim")
    if any(train_meta.get(k) != query_meta.get(k) for k in keys):
        raise UserFacingError(
            f"--train {args.train} and --query {args.query} use different projections; project both with the same "
            "model, --proj_layers, --proj_rank_total, --proj_rank_min, --proj_seed and method"
        )
    check_same_preconditioning(train_meta, query_meta, args.train, args.query)
    query_rows, query_index = [], []
    for rows, index in iter_projection_blocks(args.query):
        query_rows.append(rows.to(torch.float64))
        query_index.extend(index)
    if not query_index:
        raise UserFacingError(f"--query {args.query} holds no projected rows; run `hf-gradext project` first")
    queries = torch.cat(query_rows)
    if args.max_queries is not None:
        queries, query_index = queries[: args.max_queries], query_index[: args.max_queries]
    if not any(True for _ in iter_projection_blocks(args.train)):
        raise UserFacingError(f"--train {args.train} holds no projected rows; run `hf-gradext project` first")
    scores, best = top_k_attribution(
        lambda: iter_projection_blocks(args.train), queries, args.top_k, kind=args.kind, damping=args.damping
    )
    results = []
    for q, (qrow, matches) in enumerate(zip(query_index, best)):
        results.append(
            {
                "query_example_id": qrow.get("example_id"),
                "query_snippet": qrow.get("snippet", ""),
                "top": [
                    {
                        "rank": j + 1,
                        "train_example_id": m.get("example_id"),
                        "score": float(scores[q, j]),
                        "snippet": m.get("snippet", ""),
                    }
                    for j, m in enumerate(matches)
                ],
            }
        )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out.with_name(out.name + ".json"), out.with_name(out.name + ".csv")
    write_json_atomic(
        json_path,
        {
            "kind": args.kind,
            "damping": args.damping,
            "top_k": args.top_k,
            "train": str(args.train),
            "query": str(args.query),
            "results": results,
        },
    )
    tmp = csv_path.with_name(f".{csv_path.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["query_example_id", "rank", "train_example_id", "score", "query_snippet", "train_snippet"]
        )
        for r in results:
            for m in r["top"]:
                writer.writerow(
                    [
                        r["query_example_id"],
                        m["rank"],
                        m["train_example_id"],
                        f"{m['score']:.6g}",
                        r["query_snippet"],
                        m["snippet"],
                    ]
                )
    tmp.replace(csv_path)
    return [json_path, csv_path]
