from __future__ import annotations

import torch
from _grad_helpers import module_oracle, rel_err
from torch import nn

from hf_gradext.grad.factors import materialize
from hf_gradext.grad.linear import linear_math


def test_linear_math_matches_loop_oracle():
    torch.manual_seed(0)
    layer = nn.Linear(5, 7).double()
    a, g = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 7, dtype=torch.float64)
    got = {k: materialize(c) for k, c in linear_math(layer, a, g).items()}
    ref = module_oracle(layer, a, g)
    assert set(got) == {"weight", "bias"}
    for k in ref:
        assert rel_err(got[k], ref[k]) <= 1e-12


def test_linear_math_skips_frozen_params():
    layer = nn.Linear(5, 7)
    layer.bias.requires_grad_(False)
    assert set(linear_math(layer, torch.randn(2, 3, 5), torch.randn(2, 3, 7))) == {"weight"}


def test_linear_math_accepts_any_token_rank():
    # (B, d) inputs (one token per sample) and (B, T1, T2, d) both flatten to (B, T, d), B = 0 included.
    torch.manual_seed(0)
    layer = nn.Linear(5, 7).double()
    for shape in [(3,), (3, 2, 4), (0, 2, 4)]:
        a = torch.randn(*shape, 5, dtype=torch.float64)
        g = torch.randn(*shape, 7, dtype=torch.float64)
        got = {k: materialize(c) for k, c in linear_math(layer, a, g).items()}
        assert got["weight"].shape == (shape[0], 7, 5) and got["bias"].shape == (shape[0], 7)
        if shape[0]:
            ref = module_oracle(layer, a, g)
            for k in ref:
                assert rel_err(got[k], ref[k]) <= 1e-12
