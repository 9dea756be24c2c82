"""Plain helpers shared by the test suite (import as ``from tests.helpers import ...``).

Fixtures wrapping these live in ``tests/conftest.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

# Flags that make `hf-gradext train` on the embedded default finish in seconds.
QUICK_TRAIN_FLAGS = [
    "--max_train_samples", "64",
    "--max_eval_samples", "16",
    "--max_steps", "12",
    "--per_device_train_batch_size", "8",
    "--logging_steps", "2",
    "--save_strategy", "no",
    "--eval_strategy", "no",
    "--disable_tqdm", "true",
    "--dataloader_pin_memory", "false",
]  # fmt: skip


def make_tiny_gpt2(
    tie: bool = True,
    seed: int = 0,
    vocab_size: int = 97,
    n_positions: int = 64,
    n_layer: int = 2,
    n_embd: int = 32,
    n_head: int = 2,
    **overrides: Any,
):
    """A deterministic tiny ``GPT2LMHeadModel`` (dropout off, so forward passes are reproducible)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=tie,
        **overrides,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def make_ragged_batch(
    batch_size: int = 3,
    seq_len: int = 8,
    vocab_size: int = 97,
    lengths: list[int] | None = None,
    seed: int = 0,
    pad_id: int = 0,
) -> dict[str, torch.Tensor]:
    """A right-padded causal-LM batch with per-sample lengths.

    Returns ``input_ids``/``attention_mask``/``labels``/``position_ids``, all (B, T); padded positions
    have ``attention_mask == 0`` and ``labels == -100``; ``position_ids`` count 0.. per sample.
    Default lengths: ``seq_len, seq_len - 1, ...`` (at least 2).
    """
    g = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = [max(2, seq_len - i) for i in range(batch_size)]
    if len(lengths) != batch_size or max(lengths) > seq_len or min(lengths) < 1:
        raise ValueError(f"lengths {lengths} do not fit batch_size={batch_size}, seq_len={seq_len}")
    input_ids = torch.randint(1, vocab_size, (batch_size, seq_len), generator=g)  # (B, T)
    mask = torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
    input_ids = input_ids.masked_fill(~mask, pad_id)
    labels = input_ids.masked_fill(~mask, -100)
    position_ids = torch.arange(seq_len).expand(batch_size, seq_len).clone()  # (B, T)
    return {
        "input_ids": input_ids,
        "attention_mask": mask.long(),
        "labels": labels,
        "position_ids": position_ids,
    }


def run_module(
    module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m module args...`` and capture its output (text)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=str(cwd or REPO_ROOT),
    )


def logged_losses(log_history: list[dict[str, Any]]) -> list[float]:
    """The training losses of a ``trainer_state.json`` log history, in order."""
    return [float(e["loss"]) for e in log_history if "loss" in e]
