"""Agreement with Opacus' GradSampleModule on a Linear / Embedding / LayerNorm model."""

from __future__ import annotations

import copy

import pytest
import torch
from _grad_helpers import dense, rel_err
from torch import nn

from hf_gradext.grad import per_sample_grad_norms, per_sample_gradients
from hf_gradext.grad.api import token_mean_losses

opacus = pytest.importorskip("opacus")


class Tiny(nn.Module):
    def __init__(self, vocab: int = 23, d: int = 16, classes: int = 7) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Linear(d, 2 * d)
        self.head = nn.Linear(2 * d, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        h = torch.tanh(self.mlp(self.norm(self.emb(input_ids))))  # (B, T, 2d)
        return {"logits": self.head(h)}  # (B, T, classes)


def test_matches_opacus_grad_sample():
    torch.manual_seed(0)
    model = Tiny().double()
    ids = torch.randint(0, 23, (5, 9))
    labels = torch.randint(0, 7, (5, 9))
    labels[1, 4:] = -100
    batch = {"input_ids": ids, "labels": labels}
    ours = per_sample_gradients(model, batch, dtype=torch.float64)

    gsm = opacus.GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="sum")
    token_mean_losses(gsm(ids)["logits"], labels, shift=False).sum().backward()
    ref = {n.removeprefix("_module."): p.grad_sample for n, p in gsm.named_parameters()}
    assert set(ours) == set(ref)
    for name, r in ref.items():
        assert rel_err(dense(ours[name]), r) <= 1e-10, name
    norms = per_sample_grad_norms(model, batch)
    flat = torch.cat([r.flatten(1) for r in ref.values()], 1)
    assert rel_err(norms, flat.norm(dim=1)) <= 1e-10
