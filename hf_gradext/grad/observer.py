"""Arming the capture engine inside ``GradExtTrainer.training_step`` (the training backward itself).

HF ``Trainer`` backwards ``c * S_mb`` per microbatch, ``S_mb`` the microbatch's token-loss sum and ``c``
(``1 / num_items_in_batch`` times the world factor, or the plain token mean divided by the accumulation
steps; the grad scaler under fp16) as mirrored, once for the package, by
:func:`hf_gradext.integrations.loss.hf_loss_multiplier`. :func:`hf_trainer_loss_scale` inverts it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch

from hf_gradext.errors import UserFacingError
from hf_gradext.grad.capture import CaptureEngine
from hf_gradext.grad.loss_scaling import LossScale, valid_token_counts
from hf_gradext.integrations import loss as loss_integration
from hf_gradext.integrations.loss import hf_loss_multiplier


def trainer_shifts_labels(trainer: Any) -> bool:
    """:func:`hf_gradext.integrations.loss.shifts_labels` of ``trainer.model``, cached on the trainer.

    Asked once per training microbatch; unwrapping the model through accelerate costs ~60 us per call.
    """
    cached = getattr(trainer, "_hf_gradext_shifts_labels", None)
    if cached is None:
        cached = trainer._hf_gradext_shifts_labels = loss_integration.shifts_labels(trainer.model)
    return cached


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
        counts = valid_token_counts(inputs["labels"], shift=trainer_shifts_labels(trainer))

    # ``mult`` may stay a device scalar: reading it (or the counts) on the host would sync the GPU.
    mult = hf_loss_multiplier(trainer, num_items_in_batch, counts.sum())
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
