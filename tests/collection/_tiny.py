"""Tiny GPT-2, ragged batches and a tiny Trainer for the gradient-collection tests (no downloads)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import GPT2LMHeadModel

from hf_gradext import GradExtArguments, GradExtTrainer
from tests.helpers import make_ragged_batch, make_tiny_gpt2

VOCAB, SEQ = 61, 12


def tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32, tied: bool = True) -> GPT2LMHeadModel:
    """2-layer GPT-2, d=32, no dropout (so separate eval-mode passes see the training forward)."""
    return make_tiny_gpt2(
        tie=tied,
        seed=seed,
        vocab_size=VOCAB,
        n_positions=32,
        dtype=dtype,
        perturb=0.1,  # non-trivial biases / norm params
        training=True,
        bos_token_id=0,
        eos_token_id=0,
    )


def ragged_batch(lengths=(12, 7, 9, 3), seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded batch with -100 labels on padding and ``example_id`` 100+i."""
    return make_ragged_batch(
        lengths=lengths, vocab_size=VOCAB, seed=seed, position_ids=False, example_id_start=100
    )


def token_rows(n: int = 16, seed: int = 3, ragged: bool = True) -> list[dict[str, torch.Tensor]]:
    """``n`` fixed-length rows with an ``example_id``; ragged rows are right-padded."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (SEQ,), generator=g)
        mask = torch.ones(SEQ, dtype=torch.long)
        if ragged:
            mask[SEQ - (i % 5) :] = 0
        ids = ids * mask
        rows.append(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "labels": ids.masked_fill(mask == 0, -100),
                "example_id": torch.tensor(i),
            }
        )
    return rows


def make_trainer(output_dir: Any, model=None, rows=None, **overrides: Any) -> GradExtTrainer:
    """A GradExtTrainer with collection switched on (override any flag)."""
    kw: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        seed=0,
        collect_gradients=True,
        gradient_collection_steps=1,
        gradient_collection_max_samples=4,
        gradient_collection_save="full",
        gradient_collection_layers="all",
        dataloader_num_workers=0,
    )
    kw.update(overrides)
    args = GradExtArguments(**kw)
    return GradExtTrainer(model=model or tiny_gpt2(), args=args, train_dataset=rows or token_rows())
