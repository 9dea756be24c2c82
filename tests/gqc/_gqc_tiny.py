"""Tiny GPT-2 + synthetic token data shared by the GQC tests (no downloads)."""

from __future__ import annotations

import pytest
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


def pattern_dataset(n: int = 48, k: int = 3) -> list[dict[str, torch.Tensor]]:
    """``n`` samples cycling through ``k`` fixed sequences: per-sample noise between identical and random data,
    so gns_sample closes windows of several sizes."""
    g = torch.Generator().manual_seed(3)
    pats = [torch.randint(0, VOCAB, (SEQ,), generator=g) for _ in range(k)]
    mask = torch.ones(SEQ, dtype=torch.long)
    return [
        {"input_ids": pats[i % k], "labels": pats[i % k].clone(), "attention_mask": mask} for i in range(n)
    ]


def assert_same_decisions_after(full, resumed, step: int, rel: float) -> None:
    """A run resumed at ``step`` logs the windows (size, B_simple) of the uninterrupted ``full`` run after it."""

    def after(trainer):
        return [
            (e["step"], e["gqc/microbatches"], e["gqc/b_simple"])
            for e in trainer.state.log_history
            if "gqc/microbatches" in e and e["step"] > step
        ]

    a, b = after(full), after(resumed)
    assert len(a) > 3 and len({x[1] for x in a}) > 1  # windows of several sizes: decisions matter
    assert [x[:2] for x in a] == [x[:2] for x in b]
    assert [x[2] for x in a] == pytest.approx([x[2] for x in b], rel=rel)


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
