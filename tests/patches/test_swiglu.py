"""SwiGLU block: formula, default width and parameter count against GPT-2's GELU MLP."""

from __future__ import annotations

import pytest
import torch
from _patch_tiny import tiny_config
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

from hf_gradext.patches.swiglu import GradExtSwiGLUMLP, default_swiglu_hidden_size


def _weight_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if n.endswith("weight"))


@pytest.mark.parametrize("d", [48, 96, 768])
def test_default_width_keeps_gelu_weight_count_exactly_when_d_divisible_by_3(d):
    gelu = GPT2MLP(4 * d, tiny_config(n_embd=d))
    swiglu = GradExtSwiGLUMLP(d, default_swiglu_hidden_size(d))
    assert _weight_count(swiglu) == _weight_count(gelu) == 8 * d * d
    # The GELU MLP's 5d biases are the whole difference in total parameters.
    total = sum(p.numel() for p in gelu.parameters()) - sum(p.numel() for p in swiglu.parameters())
    assert total == 5 * d


def test_gpt2_small_width_is_2048():
    assert default_swiglu_hidden_size(768) == 2048


@pytest.mark.parametrize("d", [32, 50, 64, 100])
def test_default_width_within_d_weights_otherwise(d):
    assert abs(3 * d * default_swiglu_hidden_size(d) - 8 * d * d) <= d


def test_forward_matches_formula():
    torch.manual_seed(0)
    mlp = GradExtSwiGLUMLP(12, 20, dropout=0.0).double()
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    w1, w2, w3 = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    expected = (torch.nn.functional.silu(x @ w1.T) * (x @ w2.T)) @ w3.T
    torch.testing.assert_close(mlp(x), expected)


def test_projections_are_plain_bias_free_linears():
    mlp = GradExtSwiGLUMLP(8, 16)
    for layer in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        assert type(layer) is torch.nn.Linear and layer.bias is None
