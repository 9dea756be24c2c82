"""Per-sample gradient *contributions* and the algebra on them (pure torch).

Every layer's math turns a captured ``(a, g)`` pair into, per parameter, either

* :class:`Outer` -- ``grad_i = sum_t u_it (x) v_it`` in the parameter's own layout ``[m, n]``
  (``v is None`` for a bias: ``grad_i = sum_t u_it``); ``u`` may be an index tensor (embedding rows,
  one-hot over ``m``), or
* :class:`Dense` -- an already materialized ``(B, *param.shape)`` tensor (norm layers, fallback).

A parameter used by several modules (GPT-2's tied ``wte`` / ``lm_head``) gets a list of contributions;
its gradient is their sum, its squared norm the sum of all pairwise inner products. Inner products of
two ``Outer`` terms never need the gradient itself (the "ghost" identity)::

    <sum_t u_t v_t^T, sum_s u'_s v'_s^T> = sum_{t,s} (u_t . u'_s) (v_t . v'_s)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hf_gradext.grad.sparse import SparseRowGrad


@dataclass
class Outer:
    """``grad_i = sum_t u_it (x) v_it``.

    Attributes:
        u: ``(B, T, m)`` dense factor, or ``(B, T)`` long row indices (one-hot rows of an ``m``-row table).
        v: ``(B, T, n)`` dense factor, or ``None`` for a 1-D parameter (``grad_i = sum_t u_it``).
        m: size of the first parameter dimension.
    """

    u: Tensor
    v: Tensor | None
    m: int

    @property
    def is_index(self) -> bool:
        return not self.u.is_floating_point()

    @property
    def batch_size(self) -> int:
        return self.u.shape[0]

    @property
    def seq_len(self) -> int:
        return self.u.shape[1]

    @property
    def numel(self) -> int:
        return self.m * (1 if self.v is None else self.v.shape[-1])

    def use_ghost(self, other_seq_len: int | None = None) -> bool:
        """Ghost (Gram) products iff ``2 T S < m n``: cheaper than building the ``m x n`` gradients."""
        if self.is_index:
            return False  # sparse rows are always cheaper than a T x T equality Gram
        s = self.seq_len if other_seq_len is None else other_seq_len
        return 2 * self.seq_len * s < self.numel


@dataclass
class Dense:
    """A materialized per-sample gradient ``(B, *param.shape)``."""

    value: Tensor

    @property
    def batch_size(self) -> int:
        return self.value.shape[0]


Contribution = Outer | Dense
Materialized = Tensor | SparseRowGrad


def materialize(c: Contribution) -> Materialized:
    """The per-sample gradient of one contribution (sparse rows for index factors)."""
    if isinstance(c, Dense):
        return c.value
    if c.is_index:
        assert c.v is not None, "index factors need a value factor"
        return SparseRowGrad.from_tokens(c.u, c.v, c.m)
    if c.v is None:
        return c.u.sum(1)  # (B, m)
    return torch.einsum("btm,btn->bmn", c.u, c.v)  # (B, m, n)


def materialize_sum(cs: list[Contribution]) -> Materialized:
    """Sum of contributions to one parameter; stays sparse when every term is an index term."""
    parts = [materialize(c) for c in cs]
    if len(parts) == 1:
        return parts[0]
    dense_parts = [p for p in parts if isinstance(p, Tensor)]
    sparse_parts = [p for p in parts if isinstance(p, SparseRowGrad)]
    if not dense_parts:
        # Concatenate and re-unique so each (sample, row) appears once.
        s0 = sparse_parts[0]
        batch = s0.batch_size
        keys = torch.cat([s.sample_idx * s.num_rows + s.row_idx for s in sparse_parts])
        vals = torch.cat([s.values for s in sparse_parts])
        uniq, inv = torch.unique(keys, return_inverse=True)
        summed = vals.new_zeros(uniq.numel(), vals.shape[-1]).index_add_(0, inv, vals)
        return SparseRowGrad(uniq // s0.num_rows, uniq % s0.num_rows, summed, batch, s0.num_rows)
    total = dense_parts[0].clone()
    for p in dense_parts[1:]:
        total += p
    for s in sparse_parts:
        s.add_to_dense(total)
    return total


# --------------------------------------------------------------------------- Gram matrices
def _factor_gram(x: Tensor | None, y: Tensor | None, diag: bool) -> Tensor | None:
    """``x_t . y_s`` for factors of two contributions (``None`` = all-ones Gram).

    Shapes: ``diag=True`` -> ``(B, T, S)`` (same sample on both sides); ``diag=False`` ->
    ``(Bx, By, T, S)``. Index factors are one-hot rows.
    """
    if x is None or y is None:
        return None
    x_idx, y_idx = not x.is_floating_point(), not y.is_floating_point()
    if x_idx and y_idx:
        if diag:
            return (x.unsqueeze(2) == y.unsqueeze(1)).float()  # (B, T, S)
        return (x[:, None, :, None] == y[None, :, None, :]).float()  # (Bx, By, T, S)
    if x_idx or y_idx:
        idx, dense = (x, y) if x_idx else (y, x)  # idx (Bi, T), dense (Bd, S, m)
        if diag:
            index = idx.unsqueeze(1).expand(-1, dense.shape[1], -1)  # (B, S, T)
            gram = torch.gather(dense, 2, index)  # (B, S, T): dense_s[idx_t]
            return gram.transpose(1, 2) if x_idx else gram
        bi, bd = idx.shape[0], dense.shape[0]
        index = idx[:, None, None, :].expand(bi, bd, dense.shape[1], idx.shape[1])  # (Bi, Bd, S, T)
        gram = torch.gather(dense.unsqueeze(0).expand(bi, -1, -1, -1), 3, index)  # (Bi, Bd, S, T)
        gram = gram.transpose(2, 3)  # (Bi, Bd, T_idx, S_dense)
        return gram if x_idx else gram.permute(1, 0, 3, 2)
    y = y.to(x.dtype)
    if diag:
        return torch.bmm(x, y.transpose(1, 2))  # (B, T, S)
    return torch.einsum("atm,bsm->abts", x, y)  # (Bx, By, T, S)


def _ghost(c1: Outer, c2: Outer, diag: bool) -> Tensor:
    gu = _factor_gram(c1.u, c2.u, diag)
    gv = _factor_gram(c1.v, c2.v, diag)
    assert gu is not None
    prod = gu if gv is None else gu * gv.to(gu.dtype)
    return prod.sum((-2, -1))  # (B,) or (Bx, By)


# --------------------------------------------------------------------------- inner products
def _materialized_dots(x: Materialized, y: Materialized, diag: bool) -> Tensor:
    if isinstance(x, SparseRowGrad) and isinstance(y, SparseRowGrad):
        d = x.dots(y)
        return d.diagonal() if diag else d
    if isinstance(x, SparseRowGrad) or isinstance(y, SparseRowGrad):
        sp, de = (x, y) if isinstance(x, SparseRowGrad) else (y, x)
        de = de.to(sp.values.dtype)
        if diag:
            rows = de[sp.sample_idx, sp.row_idx]  # (U, dim)
            per = (rows * sp.values).sum(-1)  # (U,)
            return per.new_zeros(sp.batch_size).index_add_(0, sp.sample_idx, per)
        rows = de[:, sp.row_idx]  # (Bd, U, dim)
        per = torch.einsum("ud,jud->uj", sp.values, rows)  # (U, Bd)
        out = per.new_zeros(sp.batch_size, de.shape[0]).index_add_(0, sp.sample_idx, per)
        return out if isinstance(x, SparseRowGrad) else out.T
    y = y.to(x.dtype)
    if diag:
        return (x.flatten(1) * y.flatten(1)).sum(1)
    return x.flatten(1) @ y.flatten(1).T


def inner(c1: Contribution, c2: Contribution, diag: bool) -> Tensor:
    """Inner products between per-sample gradients of two contributions to the same parameter.

    Args:
        c1, c2: contributions (same parameter shape).
        diag: ``True`` -> ``(B,)`` with ``<c1_i, c2_i>`` (needs equal batch sizes); ``False`` ->
            ``(B1, B2)`` with ``<c1_i, c2_j>``.

    The ghost identity is used for two ``Outer`` terms when ``2 T S < m n`` or when exactly one of them is
    an index term (a ``T x S`` gather, no table-sized tensor); otherwise both sides are materialized.
    """
    if isinstance(c1, Outer) and isinstance(c2, Outer):
        mixed = c1.is_index != c2.is_index
        if mixed or (not c1.is_index and c1.use_ghost(c2.seq_len)):
            return _ghost(c1, c2, diag)
    if diag and c1 is c2:
        m = materialize(c1)
        return m.sq_norms() if isinstance(m, SparseRowGrad) else m.flatten(1).pow(2).sum(1)
    return _materialized_dots(materialize(c1), materialize(c2), diag)


def sq_norms(cs: list[Contribution]) -> Tensor:
    """``(B,)`` squared norm of the per-sample gradient ``sum(cs)``: all pairwise inner products."""
    total = inner(cs[0], cs[0], diag=True)
    for i in range(len(cs)):
        for j in range(i, len(cs)):
            if i == j and i == 0:
                continue
            term = inner(cs[i], cs[j], diag=True)
            total = total + (term if i == j else 2 * term)
    return total


def dots(cs1: list[Contribution], cs2: list[Contribution]) -> Tensor:
    """``(B1, B2)`` inner products between ``sum(cs1)`` and ``sum(cs2)`` per sample pair."""
    total = None
    for c1 in cs1:
        for c2 in cs2:
            term = inner(c1, c2, diag=False)
            total = term if total is None else total + term
    assert total is not None
    return total
