"""Statistics of per-sample gradient norms, grouped by layer family (pure torch).

Conventions (tested against numpy): ``std`` is the population standard deviation (``ddof=0``),
percentiles interpolate linearly (numpy's default), ``spread`` is the coefficient of variation
``std / mean`` of the per-sample norms and ``max_over_median`` their tail ratio.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

PERCENTILES: tuple[int, ...] = (10, 50, 90, 99)
GROUPS: tuple[str, ...] = ("attn", "mlp", "embed", "norm", "other")

# Name patterns per group, checked in order; the module type (when known) wins over the name.
_GROUP_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("norm", re.compile(r"(^|\.)(ln_\w*|\w*norm\w*)($|\.)", re.IGNORECASE)),
    ("embed", re.compile(r"(^|\.)(wte|wpe|embed\w*|lm_head|tok_embeddings)($|\.)", re.IGNORECASE)),
    ("attn", re.compile(r"(^|\.)(attn|attention|self_attn|q_proj|k_proj|v_proj|o_proj|c_attn)($|\.)")),
    ("mlp", re.compile(r"(^|\.)(mlp|ffn|feed_forward|c_fc|fc\d?|gate_proj|up_proj|down_proj)($|\.)")),
)


def layer_group(name: str, family: str | None = None) -> str:
    """The group (attn/mlp/embed/norm/other) of a module name; ``family`` ("embedding"/"norm") wins."""
    if family == "embedding":
        return "embed"
    if family == "norm":
        return "norm"
    for group, pattern in _GROUP_PATTERNS:
        if pattern.search(name):
            return group
    return "other"


def norm_summary(norms: Tensor) -> dict[str, float]:
    """Summary of a 1-D tensor of per-sample norms: mean, std, min, max, percentiles, spread."""
    x = norms.detach().double().flatten()  # (n,)
    if x.numel() == 0:
        return {}
    mean = x.mean()
    std = x.std(correction=0) if x.numel() > 1 else torch.zeros((), dtype=x.dtype)
    out = {"mean": mean.item(), "std": std.item(), "min": x.min().item(), "max": x.max().item()}
    qs = torch.quantile(x, torch.tensor([p / 100 for p in PERCENTILES], dtype=x.dtype))
    out.update({f"p{p}": q.item() for p, q in zip(PERCENTILES, qs)})
    out["spread"] = (std / mean).item() if mean > 0 else 0.0
    median = out["p50"]
    out["max_over_median"] = out["max"] / median if median > 0 else 0.0
    return out


def group_sq_norms(sq_norms: dict[str, Tensor], groups: dict[str, str]) -> dict[str, Tensor]:
    """Per-sample squared norms summed within each group, plus ``"total"`` over every layer.

    Args:
        sq_norms: layer name -> ``(n,)`` per-sample squared gradient norm of that layer.
        groups: layer name -> group name.
    """
    out: dict[str, Tensor] = {}
    for layer, sq in sq_norms.items():
        group = groups.get(layer, "other")
        out[group] = out[group] + sq if group in out else sq.clone()
        out["total"] = out["total"] + sq if "total" in out else sq.clone()
    return out


def collection_stats(
    sq_norms: dict[str, Tensor], groups: dict[str, str], prefix: str = "grad_collection"
) -> dict[str, float]:
    """Flat ``{prefix}/{group}/norm_{stat}`` metrics for ``Trainer.log`` from per-layer squared norms."""
    metrics: dict[str, float] = {}
    for group, sq in group_sq_norms(sq_norms, groups).items():
        for stat, value in norm_summary(sq.clamp_min(0).sqrt()).items():
            metrics[f"{prefix}/{group}/norm_{stat}"] = value
    return metrics


def layer_norm_table(sq_norms: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """Per-layer summaries of the per-sample norms (layer -> summary)."""
    return {layer: norm_summary(sq.clamp_min(0).sqrt()) for layer, sq in sq_norms.items()}
