from __future__ import annotations

import pytest
import torch
from _grad_helpers import rel_err

from hf_gradext.grad.factors import Dense, Outer, dots, inner, materialize, materialize_sum, sq_norms
from hf_gradext.grad.sparse import SparseRowGrad

D = torch.float64


def _dense(c):
    m = materialize(c)
    return m.to_dense() if isinstance(m, SparseRowGrad) else m


def _contribs(b=3, t=4, s=5, v=9, d=6):
    g = torch.Generator().manual_seed(0)
    emb = Outer(u=torch.randint(0, v, (b, t), generator=g), v=torch.randn(b, t, d, generator=g, dtype=D), m=v)
    head = Outer(
        u=torch.randn(b, s, v, generator=g, dtype=D), v=torch.randn(b, s, d, generator=g, dtype=D), m=v
    )
    dense = Dense(torch.randn(b, v, d, generator=g, dtype=D))
    return emb, head, dense


def test_auto_choice_follows_2T2_rule():
    small_t = Outer(u=torch.randn(2, 3, 40), v=torch.randn(2, 3, 40), m=40)  # 2*9 < 1600: ghost
    long_t = Outer(u=torch.randn(2, 30, 4), v=torch.randn(2, 30, 4), m=4)  # 2*900 >= 16: materialize
    assert small_t.use_ghost() and not long_t.use_ghost()
    assert not Outer(u=torch.zeros(2, 3, dtype=torch.long), v=torch.randn(2, 3, 40), m=100).use_ghost()


@pytest.mark.parametrize("pair", [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (2, 1)])
@pytest.mark.parametrize("diag", [True, False])
def test_inner_matches_materialized(pair, diag):
    cs = _contribs()
    c1, c2 = cs[pair[0]], cs[pair[1]]
    x, y = _dense(c1).flatten(1), _dense(c2).flatten(1)
    ref = (x * y).sum(1) if diag else x @ y.T
    assert rel_err(inner(c1, c2, diag=diag), ref) <= 1e-12


def test_tied_sum_norms_and_dots():
    emb, head, _ = _contribs()
    total = materialize_sum([emb, head])  # dense because head is dense
    ref = _dense(emb) + _dense(head)
    assert rel_err(total, ref) <= 1e-12
    assert rel_err(sq_norms([emb, head]), ref.flatten(1).pow(2).sum(1)) <= 1e-12
    assert rel_err(dots([emb, head], [emb, head]), ref.flatten(1) @ ref.flatten(1).T) <= 1e-12


def test_bias_outer_and_sparse_sum():
    g = torch.randn(2, 3, 4, dtype=D)
    bias = Outer(u=g, v=None, m=4)
    assert rel_err(materialize(bias), g.sum(1)) <= 1e-12
    assert rel_err(sq_norms([bias]), g.sum(1).pow(2).sum(1)) <= 1e-12
    emb, _, _ = _contribs()
    both = materialize_sum([emb, emb])
    assert isinstance(both, SparseRowGrad)
    assert rel_err(both.to_dense(), 2 * _dense(emb)) <= 1e-12
