"""Per-layer random projection matrices, reproducible from ``(seed, layer name)`` alone.

Why the name and not the position: selecting a different set of layers, or adding embeddings, must not
change the matrices of the layers that stay. Why a CPU ``torch.Generator``: CUDA and CPU generators give
different streams, and the global RNG belongs to the user (dropout, data order); we never touch it.

Scaling. ``gaussian``: entries of ``P_i`` are N(0, 1/k_i) and of ``P_o`` N(0, 1/k_o), so
``E[(P_o x P_i)^T (P_o x P_i)] = I`` and projected dot products are unbiased estimates of the true ones.
``rademacher``: entries of ``P_i`` are +-1/sqrt(k_i) (and of ``P_o`` +-1/sqrt(k_o)) with equal probability: the
same identity expectation, and a lower variance of projected dot products than Gaussian entries (a +-1 entry
has fourth moment 1 where a Gaussian has 3, and the Kronecker product compounds it on both sides).
``row_orthonormal``: rows of each factor are orthonormal (QR of the same Gaussian draw) and rescaled by
``sqrt(d / k)`` so the expectation is again the identity; layers therefore keep their relative weight in
concatenated dot products. If ``k > d`` the factor has orthonormal *columns* instead (scale 1).
"""

from __future__ import annotations

import hashlib
import math

import torch

METHODS = ("gaussian", "rademacher", "row_orthonormal")


def layer_seed(seed: int, name: str) -> int:
    """A 63-bit seed from sha256 of ``f"{seed}:{name}"`` (stable across processes and Python versions)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _factor(gen: torch.Generator, k: int, d: int, method: str) -> torch.Tensor:
    """One ``(k, d)`` factor in float64 (drawn in float32 so every dtype sees the same numbers)."""
    if method == "rademacher":
        signs = torch.randint(0, 2, (k, d), generator=gen, dtype=torch.int64)  # (k, d) in {0, 1}
        return (signs * 2 - 1).to(torch.float64) / math.sqrt(k)
    draw = torch.randn(k, d, generator=gen, dtype=torch.float32).to(torch.float64)  # (k, d)
    if method == "gaussian":
        return draw / math.sqrt(k)
    if method == "row_orthonormal":
        if k <= d:
            q, r = torch.linalg.qr(draw.T)  # q: (d, k) orthonormal columns
            q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
            return q.T * math.sqrt(d / k)  # (k, d), rows orthonormal, then rescaled
        q, r = torch.linalg.qr(draw)  # q: (k, d) orthonormal columns
        return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
    raise ValueError(f"unknown projection method {method!r}; choose one of {METHODS}")


def make_factors(
    name: str, d_in: int, d_out: int, k_i: int, k_o: int, seed: int, method: str = "gaussian"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P_i, P_o)`` for layer ``name``: ``P_i`` (k_i, d_in), ``P_o`` (k_o, d_out), float64 on CPU.

    ``P_i`` is drawn first, then ``P_o``, from one CPU generator seeded with :func:`layer_seed`.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(layer_seed(seed, name))
    p_in = _factor(gen, k_i, d_in, method)
    p_out = _factor(gen, k_o, d_out, method)
    return p_in, p_out
