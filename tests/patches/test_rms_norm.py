"""GradExtRMSNorm against the textbook formula (float64 oracle)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_gradext.patches.rms_norm import GradExtRMSNorm, rms_norm_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference_formula(dtype):
    torch.manual_seed(0)
    norm = GradExtRMSNorm(24, eps=1e-5, dtype=dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 7, 24, dtype=dtype) * 3 + 1
    expected = rms_norm_reference(x, norm.weight, 1e-5)
    torch.testing.assert_close(norm(x), expected, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-6)


def test_reference_formula_by_hand():
    x = torch.tensor([[3.0, 4.0]])  # mean square 12.5
    out = rms_norm_reference(x, torch.tensor([1.0, 2.0]), eps=0.0)
    torch.testing.assert_close(out, torch.tensor([[3.0, 8.0]]) / 12.5**0.5)


def test_gradients_match_float64_autograd():
    torch.manual_seed(1)
    norm = GradExtRMSNorm(16, eps=1e-6, dtype=torch.float64)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    ref_w = norm.weight.detach().clone().requires_grad_(True)
    ref_x = x.detach().clone().requires_grad_(True)
    norm(x).pow(3).sum().backward()
    rms_norm_reference(ref_x, ref_w, 1e-6).pow(3).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    torch.testing.assert_close(norm.weight.grad, ref_w.grad)


def test_is_a_plain_torch_rmsnorm_without_bias():
    """The per-sample gradient engine and HF init rely on a plain nn.RMSNorm with weight and eps."""
    norm = GradExtRMSNorm(8, eps=1e-4)
    assert isinstance(norm, nn.RMSNorm)
    assert norm.eps == 1e-4
    assert [n for n, _ in norm.named_parameters()] == ["weight"]
    assert torch.equal(norm.weight, torch.ones(8))
