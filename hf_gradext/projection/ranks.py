"""How a layer's projection dimension is split into ``k_i x k_o`` (Kronecker factors).

A layer with weight gradient ``G`` (``d_out x d_in``) is projected to ``P_o G P_i^T`` (``k_o x k_i``).
Projecting the captured tensors costs ``d_in * k_i + d_out * k_o`` multiply-adds per token, so the rule is:

1. both factors are at least ``rank_min`` and, where the layer allows, at most the dimension they
   project (``k_i <= d_in``, ``k_o <= d_out``: a factor larger than its dimension adds no information);
2. among those, the product ``k_i * k_o`` is as close as possible to ``rank_total``;
3. among those, the cost ``d_in * k_i + d_out * k_o`` is the smallest;
4. remaining ties go to the smaller ``k_i`` (deterministic).

``rule="balanced"`` (``--proj_split balanced``, the default of :class:`KroneckerProjector` and the flags since
0.2) puts a larger ``min(k_i, k_o)`` before the cost in step 3: ``P_o G P_i^T`` has rank at most
``min(k_i, k_o)``, and a per-sample gradient summed over T tokens has rank up to T, so the square-most split
keeps more of it (measured in recipes/benchmarks/attribution_lds.py: higher LDS at D = 2048, 18.5% more
projection multiply-adds on GPT-2 small: 196,608 against 165,888 per token and layer group).

For GPT-2 small at ``rank_total=256, rank_min=8``, ``rule="cost"``: attention ``c_attn`` (768 -> 2304) gets
``k_i=32, k_o=8``; ``c_proj`` (768 -> 768) gets ``16 x 16``; ``mlp.c_fc`` (768 -> 3072) gets ``32 x 8``;
``mlp.c_proj`` (3072 -> 768) gets ``8 x 32``. ``rule="balanced"``: ``16 x 16`` everywhere.
"""

from __future__ import annotations

from hf_gradext.errors import UserFacingError

SPLIT_RULES = ("cost", "balanced")


def split_rank(
    d_in: int, d_out: int, rank_total: int, rank_min: int = 8, rule: str = "cost"
) -> tuple[int, int]:
    """Return ``(k_i, k_o)`` for a layer with ``d_in`` inputs and ``d_out`` outputs (rules in the module doc).

    Raises:
        UserFacingError: ``rank_total`` or ``rank_min`` is not positive, or ``rank_min**2 > rank_total``.
    """
    if rank_min < 1:
        raise UserFacingError(f"--proj_rank_min={rank_min} must be >= 1; pass a positive integer")
    if rank_total < rank_min * rank_min:
        raise UserFacingError(
            f"--proj_rank_total={rank_total} is smaller than --proj_rank_min**2={rank_min * rank_min}; "
            "raise --proj_rank_total or lower --proj_rank_min"
        )
    if rule not in SPLIT_RULES:
        raise ValueError(f"rule={rule!r}: use one of {', '.join(SPLIT_RULES)}")
    if d_in < 1 or d_out < 1:
        raise ValueError(f"layer dimensions must be positive, got d_in={d_in}, d_out={d_out}")
    hi_i = max(rank_min, min(d_in, rank_total // rank_min))
    hi_o = max(rank_min, min(d_out, rank_total // rank_min))
    best: tuple[int, int, int, int, int] | None = None  # (distance, -min or 0, cost, k_i, k_o)
    for k_i in range(rank_min, hi_i + 1):
        base = rank_total // k_i
        for k_o in {base, base + 1}:
            k_o = min(max(k_o, rank_min), hi_o)
            balance = -min(k_i, k_o) if rule == "balanced" else 0
            key = (abs(k_i * k_o - rank_total), balance, d_in * k_i + d_out * k_o, k_i, k_o)
            if best is None or key < best:
                best = key
    assert best is not None
    return best[3], best[4]
