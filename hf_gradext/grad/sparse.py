"""Sparse per-sample gradients for embedding tables: only the rows a sample touched.

A dense per-sample gradient of GPT-2's 50257 x 768 embedding is 154 MB per sample in fp32; a sample of
T tokens touches at most T rows, so we keep ``(sample, row) -> values`` triples instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SparseRowGrad:
    """Per-sample gradient of a ``[num_rows, dim]`` table, stored as the touched rows only.

    Attributes:
        sample_idx: ``(U,)`` long, which sample each stored row belongs to.
        row_idx: ``(U,)`` long, which table row it is. Each ``(sample, row)`` pair appears once.
        values: ``(U, dim)`` the gradient of that row for that sample.
        batch_size: number of samples ``B``.
        num_rows: table size ``V`` (dense shape is ``(B, V, dim)``).
    """

    sample_idx: Tensor
    row_idx: Tensor
    values: Tensor
    batch_size: int
    num_rows: int

    @classmethod
    def from_tokens(cls, ids: Tensor, grads: Tensor, num_rows: int) -> SparseRowGrad:
        """Sum token-level row gradients into unique ``(sample, row)`` entries.

        Args:
            ids: ``(B, T)`` row index used by each token.
            grads: ``(B, T, dim)`` gradient w.r.t. the looked-up row of each token.
            num_rows: table size ``V``.
        """
        batch, seq = ids.shape
        sample = torch.arange(batch, device=ids.device).unsqueeze(1).expand(batch, seq)  # (B, T)
        keys = (sample * num_rows + ids).reshape(-1)  # (B*T,) unique per (sample, row)
        uniq, inverse = torch.unique(keys, return_inverse=True)
        values = grads.new_zeros(uniq.numel(), grads.shape[-1])
        values.index_add_(0, inverse, grads.reshape(-1, grads.shape[-1]))  # (U, dim)
        return cls(uniq // num_rows, uniq % num_rows, values, batch, num_rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.batch_size, self.num_rows, self.values.shape[-1]))

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def to_dense(self) -> Tensor:
        """The ``(B, V, dim)`` dense tensor (only for small tables or tests)."""
        dense = self.values.new_zeros(self.shape)
        dense.index_put_((self.sample_idx, self.row_idx), self.values, accumulate=True)
        return dense

    def add_to_dense(self, dense: Tensor) -> Tensor:
        """Add these rows into an existing ``(B, V, dim)`` tensor in place and return it."""
        dense.index_put_((self.sample_idx, self.row_idx), self.values.to(dense.dtype), accumulate=True)
        return dense

    def sq_norms(self) -> Tensor:
        """``(B,)`` squared Frobenius norm per sample."""
        out = self.values.new_zeros(self.batch_size)
        return out.index_add_(0, self.sample_idx, self.values.pow(2).sum(-1))

    def dots(self, other: SparseRowGrad) -> Tensor:
        """``(B_self, B_other)`` inner products between the samples of two sparse gradients."""
        if self.num_rows != other.num_rows:
            raise ValueError("SparseRowGrad.dots: tables of different sizes")
        # Join on the row index: (U_a, U_b) equality mask, small because U <= B*T.
        same = self.row_idx.unsqueeze(1) == other.row_idx.unsqueeze(0)  # (U_a, U_b)
        vals = (self.values @ other.values.to(self.values.dtype).T) * same  # (U_a, U_b)
        out = vals.new_zeros(self.batch_size, other.batch_size)
        rows = vals.new_zeros(self.batch_size, vals.shape[1]).index_add_(0, self.sample_idx, vals)
        return out.index_add_(1, other.sample_idx, rows)
