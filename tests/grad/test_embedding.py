from __future__ import annotations

import pytest
import torch
from _grad_helpers import rel_err
from torch import nn

from hf_gradext.errors import UserFacingError
from hf_gradext.grad.embedding import embedding_math
from hf_gradext.grad.factors import materialize
from hf_gradext.grad.sparse import SparseRowGrad


def _oracle(layer, ids, g):
    rows = []
    for i in range(ids.shape[0]):
        (gr,) = torch.autograd.grad((layer(ids[i : i + 1]) * g[i : i + 1]).sum(), layer.weight)
        rows.append(gr)
    return torch.stack(rows)


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_sparse_rows_match_oracle(padding_idx):
    torch.manual_seed(0)
    layer = nn.Embedding(11, 4, padding_idx=padding_idx).double()
    ids = torch.tensor([[1, 3, 1, 0], [0, 0, 2, 10]])  # repeated ids within a sample must be summed
    g = torch.randn(2, 4, 4, dtype=torch.float64)
    got = materialize(embedding_math(layer, ids, g)["weight"])
    assert isinstance(got, SparseRowGrad) and got.values.shape[0] <= 8
    assert rel_err(got.to_dense(), _oracle(layer, ids, g)) <= 1e-12


def test_scale_grad_by_freq_is_refused():
    layer = nn.Embedding(5, 3, scale_grad_by_freq=True)
    with pytest.raises(UserFacingError, match="scale_grad_by_freq"):
        embedding_math(layer, torch.zeros(1, 2, dtype=torch.long), torch.randn(1, 2, 3))
