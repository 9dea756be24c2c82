from __future__ import annotations

import pytest
import torch
from _grad_helpers import dense, module_oracle, rel_err
from torch import nn

from hf_gradext.grad import gradient_similarity, per_sample_grad_norms, per_sample_gradients
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


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.LayerNorm(6),
        lambda: nn.LayerNorm(6, bias=False),
        lambda: nn.RMSNorm(6),
        lambda: LlamaLikeRMSNorm(6),
    ],
    ids=["layernorm", "layernorm_nobias", "rmsnorm", "hf_rmsnorm"],
)
@pytest.mark.parametrize("batch", [0, 1, 4])
def test_normalized_shape_covering_every_non_batch_dim(make, batch):
    # A (B, d) input: no token dim to sum over. Tensor.sum(()) used to sum the batch away to a 0-dim scalar.
    torch.manual_seed(0)
    layer = make().double()
    a = torch.randn(batch, 6, dtype=torch.float64) * 2 + 1
    g = torch.randn(batch, 6, dtype=torch.float64)
    got = {k: materialize(c) for k, c in lookup(layer).math(layer, a, g).items()}
    ref = module_oracle(layer, a, g) if batch else {n: p.new_zeros(0, 6) for n, p in layer.named_parameters()}
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].shape == (batch, 6)
        assert rel_err(got[k], ref[k]) <= 1e-12


def test_layer_norm_over_several_dims_rank4():
    torch.manual_seed(0)
    layer = nn.LayerNorm((3, 6)).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
    a, g = torch.randn(2, 4, 3, 6, dtype=torch.float64), torch.randn(2, 4, 3, 6, dtype=torch.float64)
    got = {k: materialize(c) for k, c in lookup(layer).math(layer, a, g).items()}
    ref = module_oracle(layer, a, g)
    for k in ref:
        assert got[k].shape == (2, 3, 6) and rel_err(got[k], ref[k]) <= 1e-12


def test_input_without_batch_dim_is_a_clear_error():
    layer = nn.LayerNorm((3, 6))
    with pytest.raises(ValueError, match="batch"):
        lookup(layer).math(layer, torch.randn(3, 6), torch.randn(3, 6))


class Classifier(nn.Module):
    """Pooled features -> LayerNorm on a (B, d) tensor -> logits, the shape the issue hit."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(13, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.emb(input_ids).mean(1)  # (B, d)
        return {"logits": self.head(self.norm(pooled)).unsqueeze(1)}  # (B, 1, classes)


def test_api_norms_and_similarity_with_a_batch_level_layer_norm():
    torch.manual_seed(0)
    model = Classifier().double()
    with torch.no_grad():
        model.norm.bias.normal_()
    batch = {"input_ids": torch.randint(0, 13, (5, 7)), "labels": torch.randint(0, 3, (5, 1))}
    grads = per_sample_gradients(model, batch, dtype=torch.float64)
    assert grads["norm.weight"].shape == (5, 8) and grads["norm.bias"].shape == (5, 8)
    rows = []
    for i in range(5):
        model.zero_grad()
        logits = model(batch["input_ids"][i : i + 1])["logits"][:, 0]
        torch.nn.functional.cross_entropy(logits, batch["labels"][i]).backward()
        rows.append(torch.cat([p.grad.flatten() for _, p in model.named_parameters()]))
    model.zero_grad()
    ref = torch.stack(rows)
    order = [n for n, _ in model.named_parameters()]
    flat = torch.cat([dense(grads[n]).flatten(1) for n in order], 1)
    assert rel_err(flat, ref) <= 1e-10
    assert rel_err(per_sample_grad_norms(model, batch), ref.norm(dim=1)) <= 1e-10
    assert rel_err(gradient_similarity(model, batch, kind="dot"), ref @ ref.T) <= 1e-10
