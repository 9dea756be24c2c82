"""Tiny GPT-2 fixtures and a float64 per-sample gradient oracle for the projection tests."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from tests import helpers

VOCAB = 61


def make_tiny_gpt2(tie: bool = True, seed: int = 0, dtype: torch.dtype = torch.float64) -> GPT2LMHeadModel:
    return helpers.make_tiny_gpt2(
        tie=tie, seed=seed, vocab_size=VOCAB, n_positions=32, n_embd=16, dtype=dtype, training=False
    )


def make_batch(lengths=(7, 4, 6), seq: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded ragged batch: pad tokens 0, attention 0 and labels -100 beyond each length."""
    return helpers.make_ragged_batch(
        lengths=lengths, seq_len=seq, vocab_size=VOCAB, seed=seed, position_ids=False
    )


def oracle_grads(model, batch, names) -> dict[str, torch.Tensor]:
    """Float64 loop: gradient of each sample's own mean token loss (computed here, not by HF)."""
    params = dict(model.named_parameters())
    out = {n: [] for n in names}
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        ids = batch["input_ids"][i : i + 1, :n]
        logits = model(input_ids=ids).logits.double()[0, :-1]  # (n-1, V)
        loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="mean")
        grads = torch.autograd.grad(loss, [params[k] for k in names], allow_unused=True)
        for k, g in zip(names, grads):
            out[k].append(torch.zeros_like(params[k]) if g is None else g)
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.fixture
def tiny_gpt2():
    return make_tiny_gpt2()
