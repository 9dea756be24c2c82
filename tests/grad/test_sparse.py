from __future__ import annotations

import torch
from _grad_helpers import rel_err

from hf_gradext.grad.sparse import SparseRowGrad


def _dense_ref(ids, grads, v):
    out = torch.zeros(ids.shape[0], v, grads.shape[-1], dtype=grads.dtype)
    for i in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            out[i, ids[i, t]] += grads[i, t]
    return out


def test_from_tokens_to_dense_norms_dots():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (3, 7), generator=g)
    grads = torch.randn(3, 7, 4, generator=g, dtype=torch.float64)
    sp = SparseRowGrad.from_tokens(ids, grads, 6)
    ref = _dense_ref(ids, grads, 6)
    assert sp.shape == ref.shape and sp.dtype == torch.float64
    assert rel_err(sp.to_dense(), ref) <= 1e-12
    assert len(set(zip(sp.sample_idx.tolist(), sp.row_idx.tolist()))) == sp.values.shape[0]  # unique rows
    assert rel_err(sp.sq_norms(), ref.flatten(1).pow(2).sum(1)) <= 1e-12
    ids2 = torch.randint(0, 6, (2, 5), generator=g)
    sp2 = SparseRowGrad.from_tokens(ids2, torch.randn(2, 5, 4, generator=g, dtype=torch.float64), 6)
    ref2 = sp2.to_dense()
    assert rel_err(sp.dots(sp2), ref.flatten(1) @ ref2.flatten(1).T) <= 1e-12
    acc = torch.ones_like(ref)
    assert rel_err(sp.add_to_dense(acc), ref + 1) <= 1e-12
