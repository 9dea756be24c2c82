import subprocess
import sys

import torch

from hf_gradext.projection.matrices import layer_seed, make_factors


def test_layer_seed_depends_on_name_and_seed():
    assert layer_seed(42, "a") == layer_seed(42, "a")
    assert layer_seed(42, "a") != layer_seed(42, "b")
    assert layer_seed(42, "a") != layer_seed(43, "a")
    assert 0 <= layer_seed(1, "x") < 2**63


def test_factors_reproducible_and_global_rng_untouched():
    state = torch.get_rng_state()
    p1 = make_factors("transformer.h.0.mlp.c_fc", 32, 128, 8, 16, seed=7)
    p2 = make_factors("transformer.h.0.mlp.c_fc", 32, 128, 8, 16, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert p1[0].shape == (8, 32) and p1[1].shape == (16, 128)
    other = make_factors("transformer.h.1.mlp.c_fc", 32, 128, 8, 16, seed=7)
    assert not torch.equal(p1[0], other[0])


def test_factors_identical_in_another_process():
    code = (
        "from hf_gradext.projection.matrices import make_factors;"
        "a,b=make_factors('layer.x',24,40,8,8,seed=3,method='row_orthonormal');"
        "print(repr(float(a.sum())), repr(float(b.double().pow(2).sum())), repr(float(a[1,2])))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    a, b = make_factors("layer.x", 24, 40, 8, 8, seed=3, method="row_orthonormal")
    assert out.split() == [repr(float(a.sum())), repr(float(b.double().pow(2).sum())), repr(float(a[1, 2]))]


def test_row_orthonormal_rows_scaled():
    p_in, p_out = make_factors("l", 64, 8, 16, 32, seed=0, method="row_orthonormal")
    # k <= d: rows orthonormal then scaled by sqrt(d/k) -> P P^T = (d/k) I
    torch.testing.assert_close(p_in @ p_in.T, torch.eye(16, dtype=torch.float64) * 4, atol=1e-12, rtol=0)
    # k > d: orthonormal columns, P^T P = I
    torch.testing.assert_close(p_out.T @ p_out, torch.eye(8, dtype=torch.float64), atol=1e-12, rtol=0)


def test_gaussian_and_orthonormal_dot_products_unbiased():
    gen = torch.Generator().manual_seed(0)
    d_out, d_in, k_i, k_o = 12, 10, 4, 3
    x = torch.randn(d_out * d_in, generator=gen, dtype=torch.float64)
    y = x + 0.5 * torch.randn(d_out * d_in, generator=gen, dtype=torch.float64)
    for method in ("gaussian", "rademacher", "row_orthonormal"):
        est = []
        for s in range(1500):
            p_in, p_out = make_factors("l", d_in, d_out, k_i, k_o, seed=s, method=method)
            kron = torch.kron(p_out, p_in)
            est.append(float((kron @ x) @ (kron @ y)))
        est = torch.tensor(est, dtype=torch.float64)
        # mean within 4 standard errors of the truth
        assert abs(est.mean() - x @ y) < 4 * est.std() / len(est) ** 0.5, method


def test_rademacher_entries_are_signs_over_sqrt_k():
    p_in, p_out = make_factors("l", 64, 8, 16, 4, seed=1, method="rademacher")
    assert set((p_in * 4).round().unique().tolist()) == {-1.0, 1.0}  # k_i = 16: +-1/4
    assert set((p_out * 2).round().unique().tolist()) == {-1.0, 1.0}  # k_o = 4: +-1/2
    assert torch.equal(p_in, make_factors("l", 64, 8, 16, 4, seed=1, method="rademacher")[0])
    assert not torch.equal(p_in, make_factors("l", 64, 8, 16, 4, seed=2, method="rademacher")[0])


def test_rademacher_dot_products_vary_less_than_gaussian():
    # Why the method exists: for a Kronecker sketch the variance of a projected squared norm is
    # 2|x|^4/k-ish plus a fourth-moment term that is 0 for +-1 entries and positive for Gaussian ones.
    gen = torch.Generator().manual_seed(1)
    d_out, d_in, k_i, k_o = 16, 12, 2, 2
    x = torch.randn(d_out * d_in, generator=gen, dtype=torch.float64)
    spread = {}
    for method in ("gaussian", "rademacher"):
        est = []
        for s in range(800):
            p_in, p_out = make_factors("l", d_in, d_out, k_i, k_o, seed=s, method=method)
            est.append(float((torch.kron(p_out, p_in) @ x).pow(2).sum()))
        spread[method] = torch.tensor(est).var().item()
    assert spread["rademacher"] < 0.8 * spread["gaussian"], spread
