"""Tiny GPT-2 + synthetic token data shared by the GQC tests (no downloads)."""

from __future__ import annotations

import torch

from tests.helpers import make_tiny_gpt2

VOCAB, SEQ = 64, 16


def tiny_model(seed: int = 0, dropout: float = 0.0):
    """The shared tiny GPT-2 at this file's vocabulary and sequence length."""
    return make_tiny_gpt2(seed=seed, vocab_size=VOCAB, n_positions=SEQ, dropout=dropout)


def token_dataset(n: int = 48, seed: int = 1, ragged: bool = False) -> list[dict[str, torch.Tensor]]:
    """``n`` samples of SEQ tokens; with ``ragged`` some labels are masked (-100) so token counts differ."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        labels = ids.clone()
        if ragged:
            labels[: (i * 5) % (SEQ - 2)] = -100
        rows.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones(SEQ, dtype=torch.long)})
    return rows


def train_kwargs(output_dir, **overrides) -> dict:
    """The ``TrainingArguments`` fields every GQC test shares (CPU, deterministic, no saving/reporting)."""
    kw = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        num_train_epochs=1,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kw.update(overrides)
    return kw


def gqc_args(tmp_path, **overrides):
    from hf_gradext.arguments import GradExtArguments

    gqc = dict(gqc="gnts", gqc_threshold_start=0.5, gqc_max_microbatches=4)
    return GradExtArguments(**train_kwargs(tmp_path, **{**gqc, **overrides}))
