"""The GQC run's progress bar counts data (microbatches toward the horizon), not optimizer steps."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from transformers.trainer_callback import ProgressCallback

from hf_gradext.callbacks.gqc_progress import GQCProgressCallback
from hf_gradext.trainer import GradExtTrainer

sys.path.insert(0, str(Path(__file__).parents[1] / "gqc"))
from _gqc_tiny import gqc_args, tiny_model, token_dataset  # noqa: E402


def _bars(trainer):
    return [type(c) for c in trainer.callback_handler.callbacks if isinstance(c, ProgressCallback)]


def test_bar_reaches_the_horizon_in_microbatches_and_shows_steps(tmp_path, capsys):
    # 48 samples / 4 per microbatch = 12 microbatches; windows of up to 4 => fewer than 12 steps.
    trainer = GradExtTrainer(
        tiny_model(), args=gqc_args(tmp_path, disable_tqdm=False), train_dataset=token_dataset()
    )
    assert _bars(trainer) == [GQCProgressCallback]  # HF's step-counted bar is replaced, not doubled
    trainer.train()
    steps = trainer.state.global_step
    assert 1 <= steps < 12
    err = capsys.readouterr().err
    final = [line for line in re.split(r"[\r\n]", err) if line.startswith("GQC:")][-1]
    assert "12/12" in final and "100%" in final, final
    assert f"steps={steps}" in final, final


def test_hf_bar_kept_without_gqc_or_with_bars_disabled(tmp_path):
    plain = GradExtTrainer(
        tiny_model(), args=gqc_args(tmp_path, gqc="none", disable_tqdm=False), train_dataset=token_dataset()
    )
    assert _bars(plain) == [ProgressCallback]
    quiet = GradExtTrainer(tiny_model(), args=gqc_args(tmp_path), train_dataset=token_dataset())
    assert _bars(quiet) == []
