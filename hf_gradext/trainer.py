"""``GradExtTrainer``: a thin ``transformers.Trainer`` subclass.

It owns three things and nothing else:

* the GQC step loop (delegated to :mod:`hf_gradext.gqc.loop` when ``args.gqc != "none"``);
* *microbatch observers*: objects called right before and right after each microbatch's
  forward/backward inside ``training_step`` (the per-sample gradient engine arms its hooks here so
  numbers come out of the training backward itself);
* attaching the feature callbacks (throughput, gradient collection, projection) that the
  ``GradExtArguments`` flags switch on.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import torch
from torch import nn
from transformers import Trainer

# "module:function" factories; each takes the trainer and returns a TrainerCallback or None.
# Kept as strings so a feature module is imported only when the trainer is built.
CALLBACK_FACTORIES: tuple[str, ...] = (
    "hf_gradext.callbacks.throughput:build_callback",
    "hf_gradext.callbacks.collection:build_callback",
    "hf_gradext.callbacks.projection:build_callback",
)


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
        self._microbatch_observers: list[MicrobatchObserver] = []
        for spec in CALLBACK_FACTORIES:
            module_name, func_name = spec.split(":")
            callback = getattr(importlib.import_module(module_name), func_name)(self)
            if callback is not None:
                self.add_callback(callback)

    # ------------------------------------------------------------------ microbatch observers
    def add_microbatch_observer(self, observer: MicrobatchObserver) -> None:
        self._microbatch_observers.append(observer)

    def remove_microbatch_observer(self, observer: MicrobatchObserver) -> None:
        self._microbatch_observers.remove(observer)

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        for observer in self._microbatch_observers:
            observer.before_microbatch(self, inputs, num_items_in_batch)
        loss = super().training_step(model, inputs, num_items_in_batch)
        for observer in self._microbatch_observers:
            observer.after_microbatch(self, inputs, loss)
        return loss

    # ------------------------------------------------------------------ GQC
    def _run_epoch(self, *args: Any, **kwargs: Any):
        if getattr(self.args, "gqc", "none") not in (None, "none"):
            from hf_gradext.gqc.loop import run_gqc_epoch

            return run_gqc_epoch(self, *args, **kwargs)
        return super()._run_epoch(*args, **kwargs)
