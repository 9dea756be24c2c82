"""The training progress bar of a GQC run, counted in data instead of optimizer steps.

A GQC run is bounded by data: how many optimizer steps it takes is decided on the fly, so HF's bar
(``total = max_steps``, one tick per step) would show an upper bound that the run never reaches. This
bar advances by the microbatches each step consumed, toward the run's horizon, and shows the steps
taken and the mean microbatches per step. Evaluation bars and printed logs stay HF's.
"""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm
from transformers.trainer_callback import ProgressCallback


class GQCProgressCallback(ProgressCallback):
    """HF's :class:`ProgressCallback` with the training bar in microbatches of data consumed."""

    def __init__(self, trainer: Any) -> None:
        super().__init__()
        self._trainer = trainer
        self._shown = 0

    def _run(self):
        return getattr(self._trainer, "_gqc_run", None)

    def on_train_begin(self, args, state, control, **kwargs):
        run = self._run()
        if run is None:  # not a GQC run after all: behave exactly like HF
            return super().on_train_begin(args, state, control, **kwargs)
        self.current_step = 0
        self._shown = min(int(run.position()), run.horizon)  # a resumed run starts where it stopped
        if state.is_world_process_zero:
            self.training_bar = tqdm(
                total=run.horizon, initial=self._shown, unit="mb", desc="GQC", dynamic_ncols=True
            )

    def on_step_end(self, args, state, control, **kwargs):
        run = self._run()
        if run is None:
            return super().on_step_end(args, state, control, **kwargs)
        if not state.is_world_process_zero or self.training_bar is None:
            return
        position = min(int(run.position()), run.horizon)
        self.training_bar.update(position - self._shown)
        self._shown = position
        totals = run.core.totals
        steps = totals["steps"]
        used = totals["microbatches"] - totals["skipped_microbatches"]
        self.training_bar.set_postfix(steps=steps, mb_per_step=f"{used / steps:.2f}" if steps else "-")


def build_callback(trainer: Any) -> GQCProgressCallback | None:
    """Swap HF's progress bar for the data-counted one when ``--gqc`` is on and bars are enabled."""
    args = trainer.args
    if getattr(args, "gqc", "none") == "none" or args.disable_tqdm:
        return None
    trainer.remove_callback(ProgressCallback)
    return GQCProgressCallback(trainer)
