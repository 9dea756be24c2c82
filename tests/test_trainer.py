"""GradExtTrainer's own behaviour outside GQC / capture (those have their own test folders)."""

from __future__ import annotations

import pytest

from hf_gradext.arguments import GradExtArguments
from hf_gradext.trainer import GradExtTrainer
from tests.helpers import make_tiny_gpt2


def _rows(n=32, seq=16, vocab=64):
    import torch

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (seq,), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def _trainer(out, max_steps):
    args = GradExtArguments(
        output_dir=str(out), per_device_train_batch_size=4, max_steps=max_steps, save_steps=2,
        save_strategy="steps", report_to=[], use_cpu=True, disable_tqdm=True, seed=0, logging_steps=1,
    )  # fmt: skip
    return GradExtTrainer(make_tiny_gpt2(vocab_size=64, n_positions=16), args=args, train_dataset=_rows())


def test_resume_true_skips_a_checkpoint_whose_save_was_cut_short(tmp_path):
    _trainer(tmp_path, 4).train()
    # A run killed while saving checkpoint-4: transformers writes trainer_state.json last.
    (tmp_path / "checkpoint-4" / "trainer_state.json").unlink()
    trainer = _trainer(tmp_path, 6)
    trained = []

    class Count:
        def before_microbatch(self, trainer, inputs, num_items_in_batch):
            trained.append(1)

        def after_microbatch(self, trainer, inputs, loss):
            pass

    trainer.add_microbatch_observer(Count())
    trainer.train(resume_from_checkpoint=True)  # HF alone would pick checkpoint-4 and fail to load it
    assert trainer.state.global_step == 6
    assert len(trained) == 4  # steps 3..6: resumed from checkpoint-2, not from scratch


def test_resume_true_without_any_complete_checkpoint_is_an_error(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(ValueError, match="No complete checkpoint"):
        _trainer(tmp_path, 2).train(resume_from_checkpoint=True)
