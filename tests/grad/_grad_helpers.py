"""Shared helpers for the per-sample gradient tests: tiny GPT-2, ragged batches, float64 oracle."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from transformers import GPT2LMHeadModel

from tests.helpers import make_ragged_batch, make_tiny_gpt2

VOCAB = 61
SEQ = 12


def tiny_gpt2(tied: bool = True, dtype: torch.dtype = torch.float64, seed: int = 0, **kw) -> GPT2LMHeadModel:
    """2-layer GPT-2, d=32, no dropout."""
    # Non-trivial biases / norm affine params so every formula is exercised.
    return make_tiny_gpt2(
        tie=tied, seed=seed, vocab_size=VOCAB, n_positions=32, dtype=dtype, perturb=0.1, training=True, **kw
    )


def ragged_batch(lengths=(12, 7, 9, 3), seed: int = 1, prompt: int = 2) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``attention_mask`` 0 on padding, labels -100 on padding and on a prompt prefix."""
    # pad id 0 is also a real token here (its embedding row must get nothing from padding)
    return make_ragged_batch(
        lengths=lengths, vocab_size=VOCAB, seed=seed, min_token=0, prompt=prompt, position_ids=False
    )


def own_loss(model: nn.Module, batch: dict, i: int) -> torch.Tensor:
    """Sample i's mean token loss in float64, computed here (not HF's loss)."""
    out = model(input_ids=batch["input_ids"][i : i + 1], attention_mask=batch["attention_mask"][i : i + 1])
    logits = out.logits[0, :-1].double()
    lab = batch["labels"][i, 1:]
    tok = F.cross_entropy(logits, lab, ignore_index=-100, reduction="none")
    return tok.sum() / lab.ne(-100).sum()


def oracle(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """Python loop over samples with torch.autograd.grad: ``{name: (B, *shape)}``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        grads = torch.autograd.grad(own_loss(model, batch, i), [p for _, p in named], allow_unused=True)
        rows.append([torch.zeros_like(p) if gr is None else gr for (_, p), gr in zip(named, grads)])
    return {n: torch.stack([r[k] for r in rows]) for k, (n, _) in enumerate(named)}


def dense(x) -> torch.Tensor:
    return x.to_dense() if hasattr(x, "to_dense") and not isinstance(x, torch.Tensor) else x


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def module_oracle(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loop over samples: gradient of ``<module(a_i), g_i>`` w.r.t. the module's own trainable params."""
    named = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    rows = []
    for i in range(a.shape[0]):
        out = module(a[i : i + 1])
        rows.append(torch.autograd.grad((out * g[i : i + 1]).sum(), [p for _, p in named]))
    return {n: torch.stack([r[k] for r in rows]) for k, (n, _) in enumerate(named)}


def loop_oracle(
    model: nn.Module, x: torch.Tensor, sample_loss: Callable[[torch.Tensor, int], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Float64 per-sample oracle for any sample-wise model: sample ``i``'s own forward and backward.

    ``sample_loss(out_i, i)`` is sample ``i``'s loss from its ``(1, ...)`` output. Returns
    ``{name: (B, *param.shape)}`` over the trainable parameters (``(0, *shape)`` for an empty batch).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(
            sample_loss(model(x[i : i + 1]), i), [p for _, p in named], allow_unused=True
        )
        rows.append([torch.zeros_like(p) if gr is None else gr for (_, p), gr in zip(named, grads)])
    return {
        n: torch.stack([r[k] for r in rows]) if rows else p.new_zeros((0, *p.shape))
        for k, (n, p) in enumerate(named)
    }
