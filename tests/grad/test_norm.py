from __future__ import annotations

import pytest
import torch
from _grad_helpers import module_oracle, rel_err
from torch import nn

from hf_gradext.grad.factors import materialize
from hf_gradext.grad.registry import lookup


class LlamaLikeRMSNorm(nn.Module):
    """HF-style RMSNorm (``variance_epsilon``), found by the ``*RMSNorm`` name suffix."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.LayerNorm(6),
        lambda: nn.LayerNorm(6, bias=False),
        lambda: nn.RMSNorm(6, eps=1e-5),
        lambda: LlamaLikeRMSNorm(6),
    ],
    ids=["layernorm", "layernorm_nobias", "rmsnorm", "hf_rmsnorm"],
)
def test_norm_math_matches_oracle(make):
    torch.manual_seed(0)
    layer = make().double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
    a, g = torch.randn(3, 5, 6, dtype=torch.float64) * 3 + 1, torch.randn(3, 5, 6, dtype=torch.float64)
    spec = lookup(layer)
    assert spec is not None and spec.family == "norm"
    got = {k: materialize(c) for k, c in spec.math(layer, a, g).items()}
    ref = module_oracle(layer, a, g)
    assert set(got) == set(ref)
    for k in ref:
        assert rel_err(got[k], ref[k]) <= 1e-12
