"""``GradExtTrainer``: a thin ``transformers.Trainer`` subclass.

It owns four things and nothing else:

* the GQC step loop (delegated to :mod:`hf_gradext.gqc.loop` when ``args.gqc != "none"``);
* *microbatch observers*: objects called right before and right after each microbatch's
  forward/backward inside ``training_step`` (the per-sample gradient engine arms its hooks here so
  numbers come out of the training backward itself);
* attaching the feature callbacks (throughput, gradient collection, projection) that the
  ``GradExtArguments`` flags switch on;
* bookkeeping batch columns (``example_id``): kept in the batch for the microbatch observers when a
  per-sample consumer is on, and stripped before every model forward (training, evaluation,
  prediction), since the model must never see them.

The private Trainer internals this needs (``_signature_columns``, the GQC hooks) go through
:mod:`hf_gradext.integrations.trainer`; with ``--gqc`` on, construction checks that transformers still
calls every overridden hook (and refuses DeepSpeed / FSDP), and every training microbatch checks that it
runs inside the GQC loop.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import torch
from torch import nn
from transformers import Trainer

from hf_gradext.integrations import trainer as trainer_internals

# "module:function" factories; each takes the trainer and returns a TrainerCallback or None.
# Kept as strings so a feature module is imported only when the trainer is built.
CALLBACK_FACTORIES: tuple[str, ...] = (
    "hf_gradext.callbacks.throughput:build_callback",
    "hf_gradext.callbacks.collection:build_callback",
    "hf_gradext.callbacks.projection:build_callback",
    "hf_gradext.callbacks.gqc_progress:build_callback",
)

# Dataset columns that name a sample for the per-sample consumers but are no model input. HF's
# ``remove_unused_columns`` would drop them; GradExtTrainer keeps them for the observers and strips them
# before the forward (unless the model's forward itself takes one).
BOOKKEEPING_COLUMNS: tuple[str, ...] = ("example_id",)


class MicrobatchObserver(Protocol):
    """Called around every microbatch of training (forward + backward)."""

    def before_microbatch(
        self, trainer: GradExtTrainer, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None
    ) -> None: ...

    def after_microbatch(
        self, trainer: GradExtTrainer, inputs: dict[str, Any], loss: torch.Tensor
    ) -> None: ...


class GradExtTrainer(Trainer):
    """HF ``Trainer`` with GQC, per-sample gradient capture and projection plumbing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._gqc_on:
            from hf_gradext.gqc.run import check_supported

            check_supported(self)  # backend + the overridden hooks, before any training work
        self._gqc_run = None
        self._microbatch_observers: list[MicrobatchObserver] = []
        self._strip_keys = self._bookkeeping_keys_to_strip()
        for spec in CALLBACK_FACTORIES:
            module_name, func_name = spec.split(":")
            callback = getattr(importlib.import_module(module_name), func_name)(self)
            if callback is not None:
                self.add_callback(callback)
        if self._per_sample_on:
            self._keep_bookkeeping_columns()

    # ------------------------------------------------------------------ bookkeeping columns
    @property
    def _per_sample_on(self) -> bool:
        """Whether a consumer of per-sample example ids (collection, projection) is switched on."""
        return bool(
            getattr(self.args, "collect_gradients", False) or getattr(self.args, "project_gradients", False)
        )

    def _bookkeeping_keys_to_strip(self) -> tuple[str, ...]:
        """``BOOKKEEPING_COLUMNS`` the model's forward does not take (computed before any column is added)."""
        columns = trainer_internals.signature_columns(self)
        return tuple(k for k in BOOKKEEPING_COLUMNS if k not in columns)

    def _keep_bookkeeping_columns(self) -> None:
        """Let ``example_id`` through ``remove_unused_columns`` so the microbatch observers see it."""
        columns = trainer_internals.signature_columns(self)  # HF's live list: appending keeps the column
        for key in self._strip_keys:
            if key not in columns:
                columns.append(key)

    def _model_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """``inputs`` without the bookkeeping columns (the same dict when it has none)."""
        if not any(k in inputs for k in self._strip_keys):
            return inputs
        return {k: v for k, v in inputs.items() if k not in self._strip_keys}

    # ------------------------------------------------------------------ microbatch observers
    def add_microbatch_observer(self, observer: MicrobatchObserver) -> None:
        self._microbatch_observers.append(observer)

    def remove_microbatch_observer(self, observer: MicrobatchObserver) -> None:
        self._microbatch_observers.remove(observer)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """HF's ``train``; ``resume_from_checkpoint=True`` takes the newest checkpoint that finished saving.

        (transformers would take the newest ``checkpoint-*`` folder, even one a killed run left half-written.)
        """
        if resume_from_checkpoint is True:
            from hf_gradext.checkpoints import newest_complete_checkpoint

            resume_from_checkpoint = newest_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint found in output directory ({self.args.output_dir})")
        self._gqc_run = None  # built anew by this call's set_initial_training_values (the loop checks it)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        if self._gqc_on:
            from hf_gradext.gqc.loop import check_in_gqc_loop

            check_in_gqc_loop(self)  # before the backward: a bypassed GQC loop must not train at all
        # Observers see the full batch (example ids included); the model sees model inputs only.
        for observer in self._microbatch_observers:
            observer.before_microbatch(self, inputs, num_items_in_batch)
        loss = super().training_step(model, self._model_inputs(inputs), num_items_in_batch)
        for observer in self._microbatch_observers:
            observer.after_microbatch(self, inputs, loss)
        return loss

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any):
        # Also reached directly (subclasses, evaluation with labels): never forward bookkeeping columns.
        return super().compute_loss(model, self._model_inputs(inputs), *args, **kwargs)

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any):
        # Evaluation batches carry example_id too when it was kept for training; the model must not see it.
        return super().prediction_step(model, self._model_inputs(inputs), *args, **kwargs)

    # ------------------------------------------------------------------ GQC
    # With --gqc none none of these change anything: each one falls through to HF's method.
    # The logic lives in hf_gradext.gqc.run (sizes, checkpoint state, logs) and .loop (the epoch).
    @property
    def _gqc_on(self) -> bool:
        return getattr(self.args, "gqc", "none") not in (None, "none")

    def _run_epoch(self, *args: Any, **kwargs: Any):
        if self._gqc_on:
            from hf_gradext.gqc.loop import run_gqc_epoch

            return run_gqc_epoch(self, *args, **kwargs)
        return super()._run_epoch(*args, **kwargs)

    def set_initial_training_values(self, args, dataloader):
        if self._gqc_on:
            from hf_gradext.gqc.run import initial_training_values

            return initial_training_values(self, args, dataloader)
        return super().set_initial_training_values(args, dataloader)

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume, trial):
        out = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume, trial
        )
        if self._gqc_on:
            from hf_gradext.gqc.run import restore_position

            return restore_position(self, resume)  # data position from gqc_state.json, not global_step
        return out

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        run = self._gqc_run
        if self._gqc_on and run is not None:
            num_training_steps = run.horizon  # LR horizon in microbatches of data, not optimizer steps
        return super().create_scheduler(num_training_steps, optimizer)

    def _save_checkpoint(self, model, trial) -> None:
        if self._gqc_on:
            from hf_gradext.gqc.run import save_state

            save_state(self, trial)
        super()._save_checkpoint(model, trial)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._gqc_on:
            from hf_gradext.gqc.run import decorate_logs

            decorate_logs(self, logs)
        super().log(logs, *args, **kwargs)
