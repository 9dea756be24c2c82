"""Kronecker projection of per-sample gradient contributions (pure torch).

Convention for every layer, whatever its storage layout: with ``G_i`` the per-sample weight gradient
written as ``(d_out, d_in)`` (``nn.Linear``'s layout; HF ``Conv1D`` and ``nn.Embedding`` store the
transpose), the projected gradient is ``vec(P_o G_i P_i^T)`` flattened row-major over ``(k_o, k_i)``,
which equals ``(P_o kron P_i) vec(G_i)``.

The inputs are the registry's contributions (:mod:`hf_gradext.grad.factors`), in the *parameter's* own
layout ``[m, n]``: ``layout="out_in"`` means ``m = d_out`` (``P_o`` meets the first dim), ``"in_out"``
means ``m = d_in``. For an :class:`~hf_gradext.grad.factors.Outer` term ``G = sum_t u_t v_t^T`` the
projection is ``sum_t (P_m u_t)(P_n v_t)^T``: the ``m x n`` gradient is never built. For an index term
(embedding rows, ``u_t`` one-hot) ``P_m u_t`` is column ``u_t`` of ``P_m``, a gather, so no ``(B, T, V)``
one-hot tensor exists. A :class:`~hf_gradext.grad.factors.Dense` term is projected directly.

A parameter used by several modules (GPT-2's tied ``wte`` / ``lm_head``) has one contribution per module,
all in the same parameter layout, so its block is the sum of their projections: the projection of the sum.
"""

from __future__ import annotations

import torch

from hf_gradext.grad.factors import Contribution, Dense, Outer

LAYOUTS = ("out_in", "in_out")


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any floating input is float64, else float32 (bf16/fp16 inputs are upcast: no dtype crash)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'out_in' or 'in_out', got {layout!r}")


def _project_factor(x: torch.Tensor, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``P x_t`` per token: (B, T, d) dense rows -> (B, T, k); (B, T) ids -> the gathered columns of ``P``."""
    p = p.to(device=x.device, dtype=dtype)
    if not x.is_floating_point():
        return p.T[x]  # (B, T, k): column x_t of P, a gather
    return x.to(dtype) @ p.T  # (B, T, k)


def project_outer(
    u: torch.Tensor, v: torch.Tensor, p_in: torch.Tensor, p_out: torch.Tensor, layout: str
) -> torch.Tensor:
    """Projected per-sample gradients of ``G_i = sum_t u_it v_it^T`` (parameter layout ``[m, n]``).

    Args:
        u: (B, T, m) dense factor, or (B, T) long row ids (one-hot rows of an ``m``-row table).
        v: (B, T, n) dense factor; padding rows must be zero.
        p_in: (k_i, d_in). p_out: (k_o, d_out).
        layout: ``"out_in"`` (``m = d_out``, nn.Linear) or ``"in_out"`` (``m = d_in``: Conv1D, Embedding).

    Returns:
        (B, k_o * k_i) rows ``vec(P_o G_i P_i^T)``, float32 (float64 if any input is float64).
    """
    _check_layout(layout)
    dtype = _compute_dtype(*(t for t in (u, v, p_in, p_out) if t.is_floating_point()))
    p_m, p_n = (p_out, p_in) if layout == "out_in" else (p_in, p_out)
    u_proj = _project_factor(u, p_m, dtype)  # (B, T, k_m)
    v_proj = _project_factor(v, p_n, dtype)  # (B, T, k_n)
    o_proj, i_proj = (u_proj, v_proj) if layout == "out_in" else (v_proj, u_proj)
    out = torch.einsum("bto,bti->boi", o_proj, i_proj)  # (B, k_o, k_i)
    return out.reshape(out.shape[0], -1)


def project_contribution(
    c: Contribution, p_in: torch.Tensor, p_out: torch.Tensor, layout: str
) -> torch.Tensor:
    """Projected per-sample gradients of one registry contribution to a 2-D weight.

    Args:
        c: an ``Outer`` weight term (``v`` not ``None``) or a ``Dense`` ``(B, m, n)`` gradient, both in
            the parameter's layout.
        p_in, p_out, layout: as in :func:`project_outer`.

    Returns:
        (B, k_o * k_i).
    """
    if isinstance(c, Dense):
        return naive_project(c.value, p_in, p_out, layout)
    if isinstance(c, Outer) and c.v is not None:
        return project_outer(c.u, c.v, p_in, p_out, layout)
    raise ValueError("only 2-D weights have a Kronecker projection (got a bias / 1-D contribution)")


def project_dense(a: torch.Tensor, g: torch.Tensor, p_in: torch.Tensor, p_out: torch.Tensor) -> torch.Tensor:
    """Projected per-sample gradients of a Linear/Conv1D weight from its input and output gradient.

    Args:
        a: layer input, (B, T, d_in) (or (B, d_in) for inputs without a sequence axis).
        g: gradient w.r.t. the layer output, (B, T, d_out); padding rows must be zero.
        p_in: (k_i, d_in). p_out: (k_o, d_out).

    Returns:
        (B, k_o * k_i) rows ``vec(P_o G_i P_i^T)``, in float32 (float64 if any input is float64).
    """
    if a.dim() == 2:
        a, g = a.unsqueeze(1), g.unsqueeze(1)
    return project_outer(g, a, p_in, p_out, "out_in")  # G = sum_t g_t a_t^T in (d_out, d_in)


def project_embedding(
    ids: torch.Tensor, g: torch.Tensor, p_in: torch.Tensor, p_out: torch.Tensor
) -> torch.Tensor:
    """Projected per-sample gradients of an embedding table ``(V, d)`` from token ids (sparse-aware).

    No ``padding_idx`` masking here: the registry's embedding math (:mod:`hf_gradext.grad.embedding`)
    zeroes those rows of ``g`` before a projector sees them.

    Args:
        ids: (B, T) integer ids (token or position ids) that were looked up.
        g: (B, T, d) gradient w.r.t. the embedding output; padding rows zero.
        p_in: (k_i, V). p_out: (k_o, d).

    Returns:
        (B, k_o * k_i).
    """
    return project_outer(ids, g, p_in, p_out, "in_out")


def project_tied_head(
    h: torch.Tensor, z: torch.Tensor, p_in: torch.Tensor, p_out: torch.Tensor
) -> torch.Tensor:
    """A tied ``lm_head``'s contribution to its embedding's block (add it to that block).

    Args:
        h: (B, T, d) input of the head (final hidden states).
        z: (B, T, V) gradient w.r.t. the logits; padding rows zero.
        p_in: (k_i, V) and p_out: (k_o, d): the *embedding's* factors.

    Returns:
        (B, k_o * k_i).
    """
    # The head's weight is the table itself, [V, d] = sum_t z_t h_t^T: the table's layout (m = d_in = V).
    return project_outer(z, h, p_in, p_out, "in_out")


def naive_project(grad: torch.Tensor, p_in: torch.Tensor, p_out: torch.Tensor, layout: str) -> torch.Tensor:
    """Reference: project materialized per-sample weight gradients, ``vec(P_o G P_i^T)`` per sample.

    Args:
        grad: (B, *weight.shape) exact per-sample gradients in the module's storage layout.
        p_in: (k_i, d_in). p_out: (k_o, d_out).
        layout: ``"out_in"`` (nn.Linear) or ``"in_out"`` (HF Conv1D, nn.Embedding: transposed first).

    Returns:
        (B, k_o * k_i), equal to ``(P_o kron P_i) vec(G)``; independent of the captured (a, g) path.
    """
    _check_layout(layout)
    g = grad if layout == "out_in" else grad.transpose(-1, -2)  # (B, d_out, d_in)
    dtype = _compute_dtype(g, p_in, p_out)
    g = g.to(dtype)
    p_in, p_out = p_in.to(device=g.device, dtype=dtype), p_out.to(device=g.device, dtype=dtype)
    out = p_out @ g @ p_in.T  # (B, k_o, k_i)
    return out.reshape(out.shape[0], -1)
