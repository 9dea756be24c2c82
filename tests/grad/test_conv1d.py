from __future__ import annotations

import torch
from _grad_helpers import module_oracle, rel_err
from transformers.pytorch_utils import Conv1D

from hf_gradext.grad.factors import materialize
from hf_gradext.grad.registry import lookup


def test_conv1d_weight_in_out_layout_matches_oracle():
    torch.manual_seed(0)
    layer = Conv1D(7, 5).double()  # nf=7 outputs, nx=5 inputs: weight [5, 7]
    a, g = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 7, dtype=torch.float64)
    spec = lookup(layer)
    assert spec is not None and spec.family == "linear"
    got = {k: materialize(c) for k, c in spec.math(layer, a, g).items()}
    ref = module_oracle(layer, a, g)
    assert got["weight"].shape == (3, 5, 7)
    for k in ref:
        assert rel_err(got[k], ref[k]) <= 1e-12
