"""Kronecker projection of per-sample gradients from captured layer tensors (pure torch).

Convention for every layer, whatever its storage layout: with ``G_i`` the per-sample weight gradient
written as ``(d_out, d_in)`` (``nn.Linear``'s layout; HF ``Conv1D`` and ``nn.Embedding`` store the
transpose), the projected gradient is ``vec(P_o G_i P_i^T)`` flattened row-major over ``(k_o, k_i)``,
which equals ``(P_o kron P_i) vec(G_i)``. Since ``G_i = sum_t g_it a_it^T`` this is
``sum_t (P_o g_it)(P_i a_it)^T``: the ``d_out x d_in`` gradient is never built.

Embeddings (weight ``(V, d)``, treated as ``d_in = V``, ``d_out = d``): ``P_i a_t`` for a one-hot ``a_t``
is column ``x_t`` of ``P_i``, a gather, so no ``(B, T, V)`` one-hot tensor exists. A tied ``lm_head``
(``nn.Linear(d, V)``, weight ``(V, d)`` = the embedding's) contributes ``sum_t (P_o h_t)(P_i z_t)^T``
with ``h_t`` its input and ``z_t`` the logits gradient, added to the embedding's own block, so the tied
parameter's block is the projection of the sum of both gradient contributions.
"""

from __future__ import annotations

import torch


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 inputs are upcast: no dtype crash)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def project_dense(a: torch.Tensor, g: torch.Tensor, p_in: torch.Tensor, p_out: torch.Tensor) -> torch.Tensor:
    """Projected per-sample gradients of a Linear/Conv1D weight.

    Args:
        a: layer input, (B, T, d_in) (or (B, d_in) for inputs without a sequence axis).
        g: gradient w.r.t. the layer output, (B, T, d_out); padding rows must be zero.
        p_in: (k_i, d_in). p_out: (k_o, d_out).

    Returns:
        (B, k_o * k_i) rows ``vec(P_o G_i P_i^T)``, in float32 (float64 if any input is float64).
    """
    if a.dim() == 2:
        a, g = a.unsqueeze(1), g.unsqueeze(1)
    dtype = _compute_dtype(a, g, p_in, p_out)
    a_proj = a.to(dtype) @ p_in.to(device=a.device, dtype=dtype).T  # (B, T, k_i)
    g_proj = g.to(dtype) @ p_out.to(device=g.device, dtype=dtype).T  # (B, T, k_o)
    out = torch.einsum("bto,bti->boi", g_proj, a_proj)  # (B, k_o, k_i)
    return out.reshape(out.shape[0], -1)


def project_embedding(
    ids: torch.Tensor, g: torch.Tensor, p_in: torch.Tensor, p_out: torch.Tensor
) -> torch.Tensor:
    """Projected per-sample gradients of an embedding table ``(V, d)`` from token ids (sparse-aware).

    Args:
        ids: (B, T) integer ids (token or position ids) that were looked up.
        g: (B, T, d) gradient w.r.t. the embedding output; padding rows zero.
        p_in: (k_i, V). p_out: (k_o, d).

    Returns:
        (B, k_o * k_i).
    """
    dtype = _compute_dtype(g, p_in, p_out)
    cols = p_in.to(device=ids.device, dtype=dtype).T[ids]  # (B, T, k_i): column x_t of P_i, a gather
    g_proj = g.to(dtype) @ p_out.to(device=g.device, dtype=dtype).T  # (B, T, k_o)
    out = torch.einsum("bto,bti->boi", g_proj, cols)  # (B, k_o, k_i)
    return out.reshape(out.shape[0], -1)


def project_tied_head(
    h: torch.Tensor, z: torch.Tensor, p_in: torch.Tensor, p_out: torch.Tensor
) -> torch.Tensor:
    """The tied ``lm_head``'s contribution to its embedding's block (add it to that block).

    Args:
        h: (B, T, d) input of the head (final hidden states).
        z: (B, T, V) gradient w.r.t. the logits; padding rows zero.
        p_in: (k_i, V) and p_out: (k_o, d): the *embedding's* factors.

    Returns:
        (B, k_o * k_i).
    """
    # The head's gradient in (d_out=V, d_in=d) layout is the transpose of the embedding's (d, V) view,
    # so the roles swap: P_o meets the head's input, P_i meets the logits gradient.
    dtype = _compute_dtype(h, z, p_in, p_out)
    z_proj = z.to(dtype) @ p_in.to(device=z.device, dtype=dtype).T  # (B, T, k_i)
    h_proj = h.to(dtype) @ p_out.to(device=h.device, dtype=dtype).T  # (B, T, k_o)
    out = torch.einsum("bto,bti->boi", h_proj, z_proj)  # (B, k_o, k_i)
    return out.reshape(out.shape[0], -1)


def naive_project(grad: torch.Tensor, p_in: torch.Tensor, p_out: torch.Tensor, layout: str) -> torch.Tensor:
    """Reference: project materialized per-sample weight gradients, ``vec(P_o G P_i^T)`` per sample.

    Args:
        grad: (B, *weight.shape) exact per-sample gradients in the module's storage layout.
        p_in: (k_i, d_in). p_out: (k_o, d_out).
        layout: ``"out_in"`` (nn.Linear) or ``"in_out"`` (HF Conv1D, nn.Embedding: transposed first).

    Returns:
        (B, k_o * k_i), equal to ``(P_o kron P_i) vec(G)``; independent of the captured (a, g) path.
    """
    if layout not in ("out_in", "in_out"):
        raise ValueError(f"layout must be 'out_in' or 'in_out', got {layout!r}")
    g = grad if layout == "out_in" else grad.transpose(-1, -2)  # (B, d_out, d_in)
    dtype = _compute_dtype(g, p_in, p_out)
    g = g.to(dtype)
    p_in, p_out = p_in.to(device=g.device, dtype=dtype), p_out.to(device=g.device, dtype=dtype)
    out = p_out @ g @ p_in.T  # (B, k_o, k_i)
    return out.reshape(out.shape[0], -1)
