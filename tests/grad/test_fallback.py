from __future__ import annotations

import pytest
import torch
from _grad_helpers import module_oracle, rel_err
from torch import nn

from hf_gradext.errors import UserFacingError
from hf_gradext.grad import per_sample_gradients


class Gate(nn.Module):
    """No registered math: x * sigmoid(w) + b."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))
        self.b = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * torch.sigmoid(self.w) + self.b


class Net(nn.Module):
    def __init__(self, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(13, 6)
        self.gate = norm if norm is not None else Gate(6)
        self.head = nn.Linear(6, 5)

    def forward(self, input_ids, attention_mask=None):
        h = self.gate(self.emb(input_ids))
        return {"logits": self.head(h)}


def _batch():
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(0, 13, (3, 4), generator=g),
        "labels": torch.randint(0, 5, (3, 4), generator=g),
    }


def test_unsupported_type_is_a_clear_error():
    with pytest.raises(UserFacingError, match=r"no per-sample gradient math.*gate \(Gate\).*torch\.func"):
        per_sample_gradients(Net().double(), _batch())


def test_torch_func_fallback_matches_loop():
    torch.manual_seed(0)
    net, batch = Net().double(), _batch()
    got = per_sample_gradients(net, batch, layers="gate", dtype=torch.float64, unsupported="torch.func")
    # Oracle: per-sample loss gradients through the gate, by a loop over samples.
    ref = {}
    for name, p in net.gate.named_parameters():
        rows = []
        for i in range(3):
            logits = net(batch["input_ids"][i : i + 1])["logits"][0]
            loss = torch.nn.functional.cross_entropy(logits, batch["labels"][i])
            rows.append(torch.autograd.grad(loss, p)[0])
        ref[f"gate.{name}"] = torch.stack(rows)
    assert set(got) == set(ref)
    for k in ref:
        assert rel_err(got[k], ref[k]) <= 1e-10


def test_batchnorm_is_refused():
    with pytest.raises(UserFacingError, match="batch statistics"):
        per_sample_gradients(Net(nn.BatchNorm1d(4)), _batch(), unsupported="torch.func")


def test_module_oracle_helper_consistency():
    layer = Gate(3).double()
    a, g = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    from hf_gradext.grad.fallback import fallback_math

    got = fallback_math(layer, a, g)
    ref = module_oracle(layer, a, g)
    for k in ref:
        assert rel_err(got[k].value, ref[k]) <= 1e-12
