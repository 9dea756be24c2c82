from __future__ import annotations

import pytest
import torch
from _grad_helpers import rel_err
from torch import Tensor

from hf_gradext.grad.factors import (
    Dense,
    Outer,
    as_token_ids,
    as_tokens,
    dots,
    inner,
    materialize,
    materialize_sum,
    sq_norms,
    total_sq_norms,
)
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


def test_bias_never_takes_the_ghost_path(monkeypatch):
    # 2 T^2 = 8 < m = 50 would have chosen the ghost before; a token sum is exact and cheaper.
    from hf_gradext.grad import factors

    def no_ghost(*args, **kwargs):
        raise AssertionError("bias routed through the ghost Gram")

    monkeypatch.setattr(factors, "_ghost", no_ghost)
    g = torch.randn(3, 2, 50, dtype=D)
    bias = Outer(u=g, v=None, m=50)
    assert not bias.use_ghost()
    for method in ("auto", "ghost", "materialize"):
        assert rel_err(sq_norms([bias], method), g.sum(1).pow(2).sum(1)) <= 1e-12
        assert rel_err(dots([bias], [bias], method), g.sum(1) @ g.sum(1).T) <= 1e-12


def _key_like(t: int, ratio: float, seed: int = 0) -> tuple[Outer, Tensor]:
    """Float32 factors whose token terms cancel: ``sum_t g_t = 0`` (attention-key gradients) and inputs
    sharing a common component ``ratio`` times their spread (LayerNorm bias, massive activations)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(4, t, 64, generator=gen, dtype=D) + ratio * torch.randn(1, 1, 64, generator=gen, dtype=D)
    g = torch.randn(4, t, 48, generator=gen, dtype=D)
    g = g - g.mean(1, keepdim=True)
    c = Outer(u=g.float(), v=a.float(), m=48)  # nn.Linear layout [out, in]
    exact = torch.einsum("bto,bti->boi", c.u.double(), c.v.double())  # (B, 48, 64) from the fp32 factors
    return c, exact.flatten(1)


@pytest.mark.parametrize(("t", "ratio"), [(64, 100.0), (512, 100.0), (512, 1000.0)])
def test_float32_ghost_survives_token_cancellation(t, ratio):
    # Uncentered fp32 ghost Grams erred by 7e-4, 3e-4 and 5e-2 here (the error grows with the squared
    # condition number of the token sum); centering leaves the materialized path's order.
    c, exact = _key_like(t, ratio)
    ref = exact.pow(2).sum(1)
    ghost = sq_norms([c], "ghost").double()
    mat = sq_norms([c], "materialize").double()
    assert rel_err(ghost, ref) <= 1e-5
    assert float(((ghost - ref).abs() / ref).max()) <= 3 * float(((mat - ref).abs() / ref).max()) + 1e-6
    other, other_exact = _key_like(t, ratio, seed=1)
    cross = dots([c], [other], "ghost").double()  # (4, 4) between samples of two batches
    scale = ref.sqrt()[:, None] * other_exact.norm(dim=1)[None, :]
    assert float(((cross - exact @ other_exact.T).abs() / scale).max()) <= 1e-5


@pytest.mark.parametrize("diag", [True, False])
def test_centered_ghost_matches_materialized_in_float64(diag):
    gen = torch.Generator().manual_seed(3)
    c1 = Outer(
        u=torch.randn(3, 6, 8, generator=gen, dtype=D) + 2,
        v=torch.randn(3, 6, 9, generator=gen, dtype=D),
        m=8,
    )
    c2 = Outer(
        u=torch.randn(3, 4, 8, generator=gen, dtype=D),
        v=torch.randn(3, 4, 9, generator=gen, dtype=D) - 1,
        m=8,
    )
    x, y = _dense(c1).flatten(1), _dense(c2).flatten(1)
    ref = (x * y).sum(1) if diag else x @ y.T
    assert rel_err(inner(c1, c2, diag=diag, method="ghost"), ref) <= 1e-12
    assert inner(c1, c2, diag=diag, method="ghost").dtype == D


def test_empty_batch_and_empty_tokens():
    emb, head, dense = _contribs(b=0)
    for cs in ([emb], [head], [dense], [emb, head]):
        for method in ("auto", "ghost", "materialize"):
            assert sq_norms(cs, method).shape == (0,)
            assert dots(cs, cs, method).shape == (0, 0)
    assert _dense(head).shape == (0, 9, 6) and materialize(emb).shape == (0, 9, 6)
    no_tokens = Outer(u=torch.randn(2, 0, 5, dtype=D), v=torch.randn(2, 0, 3, dtype=D), m=5)
    assert torch.equal(sq_norms([no_tokens], "ghost"), torch.zeros(2, dtype=D))


def test_unknown_method_is_refused():
    _, head, _ = _contribs()
    with pytest.raises(ValueError, match="method"):
        sq_norms([head], "fast")


def test_as_tokens_flattens_token_dims_with_explicit_sizes():
    assert as_tokens(torch.zeros(0, 3, 2, 5)).shape == (0, 6, 5)  # reshape(0, -1, 5) is ambiguous
    assert as_tokens(torch.zeros(4, 5)).shape == (4, 1, 5)
    assert as_token_ids(torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3)
    assert as_token_ids(torch.zeros(4, dtype=torch.long)).shape == (4, 1)


def _layers(b=3, t=4, d_in=10, d_out=7, ghost=True):
    """A Linear and a Conv1D (weight + bias each, sharing the output-gradient factor as the math does),
    a tied embedding/head pair and a LayerNorm-like dense term, with their float64 per-sample gradients."""
    gen = torch.Generator().manual_seed(1)
    if not ghost:
        t = 12  # 2 T^2 >= m n: the weights are materialized
    a, g = torch.randn(b, t, d_in, generator=gen, dtype=D), torch.randn(b, t, d_out, generator=gen, dtype=D)
    a2, g2 = torch.randn(b, t, d_in, generator=gen, dtype=D), torch.randn(b, t, d_out, generator=gen, dtype=D)
    emb, head, dense = _contribs(b=b)
    contribs = {
        "fc.weight": [Outer(u=g, v=a, m=d_out)],  # nn.Linear [out, in]
        "fc.bias": [Outer(u=g, v=None, m=d_out)],
        "proj.weight": [Outer(u=a2, v=g2, m=d_in)],  # HF Conv1D [in, out]
        "proj.bias": [Outer(u=g2, v=None, m=d_out)],
        "wte.weight": [emb, head],
        "ln.weight": [dense],
    }
    grads = [
        torch.einsum("bto,bti->boi", g, a),
        g.sum(1),
        torch.einsum("bti,bto->bio", a2, g2),
        g2.sum(1),
        _dense(emb) + _dense(head),
        dense.value,
    ]
    oracle = sum(x.flatten(1).pow(2).sum(1) for x in grads)  # (B,)
    return contribs, oracle


@pytest.mark.parametrize("ghost", [True, False])
@pytest.mark.parametrize("method", ["auto", "ghost", "materialize"])
def test_total_sq_norms_folds_biases_exactly(ghost, method, monkeypatch):
    from hf_gradext.grad import factors

    contribs, oracle = _layers(ghost=ghost)
    folds = []
    real = factors._ghost_dense

    def spy(c1, c2, diag, bias_on=None):
        folds.append(bias_on)
        return real(c1, c2, diag, bias_on)

    monkeypatch.setattr(factors, "_ghost_dense", spy)
    got = total_sq_norms(contribs, method)
    assert rel_err(got, oracle) <= 1e-12
    want_folds = 2 if method == "ghost" or (method == "auto" and ghost) else 0
    assert sorted(f for f in folds if f) == (["u", "v"] if want_folds else [])
    per_parameter = sum(sq_norms(cs, method) for cs in contribs.values())
    assert rel_err(got, per_parameter) <= 1e-12


def test_total_sq_norms_keeps_a_bias_that_is_not_its_weights_factor():
    gen = torch.Generator().manual_seed(2)
    a, g = torch.randn(2, 3, 10, generator=gen, dtype=D), torch.randn(2, 3, 7, generator=gen, dtype=D)
    other = torch.randn(2, 3, 7, generator=gen, dtype=D)  # equal in shape, a different tensor
    contribs = {"fc.weight": [Outer(u=g, v=a, m=7)], "fc.bias": [Outer(u=other, v=None, m=7)]}
    oracle = torch.einsum("bto,bti->boi", g, a).flatten(1).pow(2).sum(1) + other.sum(1).pow(2).sum(1)
    assert rel_err(total_sq_norms(contribs), oracle) <= 1e-12


def test_total_sq_norms_clips_each_term_before_summing(monkeypatch):
    from hf_gradext.grad import factors

    neg, pos = Dense(torch.zeros(2, 1, dtype=D)), Dense(torch.zeros(2, 1, dtype=D))
    rounded = {id(neg): torch.tensor([-1.0, 2.0], dtype=D), id(pos): torch.tensor([3.0, 4.0], dtype=D)}
    monkeypatch.setattr(factors, "sq_norms", lambda cs, method="auto": rounded[id(cs[0])])
    contribs = {"a": [neg], "b": [pos]}
    assert torch.equal(total_sq_norms(contribs), torch.tensor([3.0, 6.0], dtype=D))
    assert torch.equal(total_sq_norms(contribs, clamp=False), torch.tensor([2.0, 6.0], dtype=D))


def test_total_sq_norms_refuses_nothing_and_unknown_methods():
    with pytest.raises(ValueError, match="no contributions"):
        total_sq_norms({})
    with pytest.raises(ValueError, match="method"):
        total_sq_norms({"w": [Dense(torch.zeros(2, 3))]}, method="fast")  # type: ignore[arg-type]
