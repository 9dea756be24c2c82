"""Arming the capture engine inside ``GradExtTrainer.training_step`` (the training backward itself).

HF ``Trainer`` (transformers 5.23) backwards, per microbatch::

    loss = S_mb / num_items_in_batch            # model accepts loss kwargs and N is known
           * (num_processes // tp_size)          # if args.average_tokens_across_devices
    or   = S_mb / n_mb / current_gradient_accumulation_steps   # otherwise (plain token mean)
    loss = loss / accelerator.gradient_accumulation_steps (1 under Trainer) * grad_scaler.scale (fp16)

where ``S_mb`` is the microbatch's token-loss sum and ``num_items_in_batch`` the valid-target count of
the whole accumulation window (over all ranks). :func:`hf_trainer_loss_scale` inverts exactly that.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch

from hf_gradext.errors import UserFacingError
from hf_gradext.grad.capture import CaptureEngine
from hf_gradext.grad.loss_scaling import LossScale, reciprocal, shifts_labels, valid_token_counts


def hf_trainer_loss_scale(
    trainer: Any, inputs: Mapping[str, Any], num_items_in_batch: torch.Tensor | int | None
) -> LossScale:
    """The :class:`LossScale` of the loss ``trainer.training_step`` will backward for ``inputs``."""
    args = trainer.args
    if getattr(trainer, "compute_loss_func", None) is not None or getattr(trainer, "label_smoother", None):
        raise UserFacingError(
            "per-sample gradients from the training backward need HF's plain token-mean cross-entropy; "
            "unset compute_loss_func / label_smoothing_factor or collect in a separate pass"
        )
    if getattr(args, "n_gpu", 1) > 1:
        raise UserFacingError(
            "per-sample gradient capture does not support torch.nn.DataParallel (n_gpu > 1); "
            "launch one process per GPU with accelerate/torchrun instead"
        )
    if "labels" not in inputs and "shift_labels" not in inputs:
        raise UserFacingError("per-sample gradient capture needs 'labels' in the training batch")
    if "shift_labels" in inputs:
        counts = valid_token_counts(inputs["shift_labels"], shift=False)
    else:
        # The real number of loss targets of each sample (HF's own num_items count may differ, e.g. it
        # does not shift for GPT-2 in transformers 5.23; we take num_items_in_batch as given).
        counts = valid_token_counts(inputs["labels"], shift=shifts_labels(trainer.model))

    from hf_gradext.integrations.trainer import model_accepts_loss_kwargs

    accepts = model_accepts_loss_kwargs(trainer)  # checked: a drift raises instead of guessing
    # ``mult`` may stay a device scalar: reading it (or the counts) on the host would sync the GPU.
    mult: float | torch.Tensor
    if accepts and num_items_in_batch is not None:
        mult = reciprocal(num_items_in_batch)
        if args.average_tokens_across_devices:
            mult = mult * (trainer.accelerator.num_processes // trainer.get_tp_size())
    else:
        mult = reciprocal(counts.sum().clamp_min(1))
    scaled_for_ga = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled_for_ga is None:
        scaled_for_ga = accepts and num_items_in_batch is not None
    if not scaled_for_ga:
        mult = mult / trainer.current_gradient_accumulation_steps
    accelerator = trainer.accelerator
    if accelerator.distributed_type != "DEEPSPEED":  # a str enum; deepspeed scales by itself
        mult = mult / accelerator.gradient_accumulation_steps
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        mult = mult * float(scaler.get_scale())  # fp16: the backwarded loss is multiplied by the scale
    return LossScale.from_token_sum(counts, mult, inputs.get("attention_mask"))


class TrainingCaptureObserver:
    """A ``MicrobatchObserver`` that arms a :class:`CaptureEngine` for chosen training microbatches.

    Args:
        engine: the engine (built on ``trainer.model``; its hooks survive later DDP wrapping).
        should_capture: ``fn(trainer, inputs) -> bool``; default: every microbatch.
        on_done: ``fn(engine, inputs)`` called after the microbatch's backward, with the records ready.

    Usage::

        engine = CaptureEngine(trainer.model, "attn,mlp")
        trainer.add_microbatch_observer(TrainingCaptureObserver(engine, on_done=consume))
    """

    def __init__(
        self,
        engine: CaptureEngine,
        should_capture: Callable[[Any, Mapping[str, Any]], bool] | None = None,
        on_done: Callable[[CaptureEngine, Mapping[str, Any]], None] | None = None,
    ) -> None:
        self.engine = engine
        self.should_capture = should_capture
        self.on_done = on_done
        self._ctx: AbstractContextManager | None = None

    def before_microbatch(
        self, trainer: Any, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None
    ) -> None:
        self._disarm()  # a previous microbatch that raised never reached after_microbatch
        if self.should_capture is not None and not self.should_capture(trainer, inputs):
            return
        ctx = self.engine.capture(hf_trainer_loss_scale(trainer, inputs, num_items_in_batch))
        ctx.__enter__()
        self._ctx = ctx

    def after_microbatch(self, trainer: Any, inputs: dict[str, Any], loss: torch.Tensor) -> None:
        if self._ctx is None:
            return
        self._disarm()
        if self.on_done is not None:
            self.on_done(self.engine, inputs)

    def _disarm(self) -> None:
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            ctx.__exit__(None, None, None)
