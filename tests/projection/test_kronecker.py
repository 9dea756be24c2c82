import pytest
import torch

from hf_gradext.grad.factors import Dense, Outer, materialize
from hf_gradext.projection.kronecker import (
    naive_project,
    project_contribution,
    project_dense,
    project_embedding,
    project_tied_head,
)
from hf_gradext.projection.matrices import make_factors

B, T = 3, 5


def _inputs(d_in, d_out, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(B, T, d_in, generator=gen, dtype=torch.float64)
    g = torch.randn(B, T, d_out, generator=gen, dtype=torch.float64)
    g[1, 3:] = 0  # padding rows carry no gradient
    return a, g


def test_linear_matches_naive_float64():
    a, g = _inputs(7, 6)
    p_in, p_out = make_factors("lin", 7, 6, 3, 4, seed=1)
    grads = torch.einsum("bto,bti->boi", g, a)  # nn.Linear layout (B, out, in)
    fast = project_dense(a, g, p_in, p_out)
    ref = naive_project(grads, p_in, p_out, "out_in")
    kron = grads.reshape(B, -1) @ torch.kron(p_out, p_in).T  # (P_o kron P_i) vec(G), independent oracle
    assert (ref - kron).abs().max() <= 1e-12 * kron.abs().max()
    assert fast.dtype == torch.float64 and fast.shape == (B, 12)
    assert (fast - ref).abs().max() <= 1e-10 * ref.abs().max()


def test_conv1d_layout_matches_naive_float64():
    a, g = _inputs(5, 9)
    p_in, p_out = make_factors("conv", 5, 9, 4, 2, seed=2, method="row_orthonormal")
    grads = torch.einsum("bti,bto->bio", a, g)  # HF Conv1D layout (B, in, out)
    ref = naive_project(grads, p_in, p_out, "in_out")
    assert (project_dense(a, g, p_in, p_out) - ref).abs().max() <= 1e-10 * ref.abs().max()


def test_embedding_with_tied_head_matches_naive_float64():
    V, d = 11, 6
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (B, T), generator=gen)
    g_emb = torch.randn(B, T, d, generator=gen, dtype=torch.float64)
    h = torch.randn(B, T, d, generator=gen, dtype=torch.float64)
    z = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    p_in, p_out = make_factors("wte", V, d, 4, 3, seed=4)
    # exact per-sample gradient of the (V, d) table: rows touched by the ids, plus the head's z h^T
    emb_grad = torch.zeros(B, V, d, dtype=torch.float64)
    for b in range(B):
        emb_grad[b].index_add_(0, ids[b], g_emb[b])
    head_grad = torch.einsum("btv,btd->bvd", z, h)  # nn.Linear(d, V) weight (V, d) layout
    ref_emb = naive_project(emb_grad, p_in, p_out, "in_out")
    ref_tied = naive_project(emb_grad + head_grad, p_in, p_out, "in_out")
    fast_emb = project_embedding(ids, g_emb, p_in, p_out)
    fast_tied = fast_emb + project_tied_head(h, z, p_in, p_out)
    assert (fast_emb - ref_emb).abs().max() <= 1e-10 * ref_emb.abs().max()
    assert (fast_tied - ref_tied).abs().max() <= 1e-10 * ref_tied.abs().max()


def test_low_precision_inputs_return_float32():
    a, g = _inputs(8, 8)
    p_in, p_out = make_factors("l", 8, 8, 4, 4, seed=0)
    out = project_dense(a.bfloat16(), g.bfloat16(), p_in.float(), p_out.float())
    ref = project_dense(a, g, p_in, p_out)
    assert out.dtype == torch.float32
    assert (out.double() - ref).norm() / ref.norm() < 2e-2


def test_two_dim_inputs_treated_as_single_token():
    a, g = _inputs(4, 3)
    p_in, p_out = make_factors("l", 4, 3, 2, 2, seed=0)
    torch.testing.assert_close(
        project_dense(a[:, 0], g[:, 0], p_in, p_out), project_dense(a[:, :1], g[:, :1], p_in, p_out)
    )


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("index", [False, True], ids=["dense", "index"])
def test_registry_contributions_match_naive_float64(layout, index):
    """Every Outer / Dense term, in the parameter's own [m, n] layout, against its materialized gradient."""
    m, n = 11, 6
    gen = torch.Generator().manual_seed(5)
    u = torch.randint(0, m, (B, T), generator=gen) if index else torch.randn(B, T, m, generator=gen).double()
    v = torch.randn(B, T, n, generator=gen, dtype=torch.float64)
    v[2, 4:] = 0  # padding rows
    d_in, d_out = (n, m) if layout == "out_in" else (m, n)
    p_in, p_out = make_factors("w", d_in, d_out, 4, 3, seed=6)
    outer = Outer(u=u, v=v, m=m)
    grad = materialize(outer)
    grad = grad.to_dense() if index else grad  # (B, m, n)
    ref = naive_project(grad, p_in, p_out, layout)
    for c in (outer, Dense(grad)):
        out = project_contribution(c, p_in, p_out, layout)
        assert out.shape == (B, 12) and (out - ref).abs().max() <= 1e-10 * ref.abs().max()


def test_bias_contributions_are_refused():
    p_in, p_out = make_factors("b", 4, 3, 2, 2, seed=0)
    with pytest.raises(ValueError, match="only 2-D weights"):
        project_contribution(Outer(u=torch.randn(B, T, 3), v=None, m=3), p_in, p_out, "out_in")
    with pytest.raises(ValueError, match="layout"):
        naive_project(torch.zeros(B, 3, 4), p_in, p_out, "rows")
