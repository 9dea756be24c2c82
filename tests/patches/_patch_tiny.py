"""Tiny GPT-2 models for the patch tests (no downloads)."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB, SEQ = 96, 16


def tiny_config(attn: str = "sdpa", n_embd: int = 48, dropout: float = 0.0, **extra) -> GPT2Config:
    # n_embd=48 is divisible by 3, so the default SwiGLU width keeps the GELU MLP's weight count exactly.
    config = GPT2Config(
        n_layer=2,
        n_embd=n_embd,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=2 * SEQ,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
        **extra,
    )
    config._attn_implementation = attn
    return config


def tiny_model(seed: int = 0, **kw) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_config(**kw))
