"""Throughput / memory logging: tokens per second, step time and peak memory in every training log.

Cheap by construction: tokens are counted per microbatch without reading device values (shape sizes,
or an on-device running sum of the attention mask), the clock is read once per logging step, and
memory is queried at logging steps only (seed 004: no per-batch memory queries). The one device read
(the token sum) happens right after transformers has already synced to read the loss.

The numbers are added to the ``logs`` dict of ``Trainer.log`` *before* transformers appends it to
``state.log_history`` and calls every callback's ``on_log``, so they reach log_history, the console
and every ``report_to`` integration alike.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import torch
from transformers import TrainerCallback

from hf_gradext.callbacks.training_logs import extend_training_logs

# Keys this callback adds to training logs.
TOKENS_PER_SECOND = "tokens_per_second"
STEP_TIME = "step_time_s"
PEAK_ACCELERATOR_MEMORY = "peak_accelerator_memory_gb"
PEAK_RSS = "peak_rss_gb"


def peak_memory_gb(device: torch.device) -> tuple[str, float]:
    """``(log key, GB)``: the allocator peak on CUDA/XPU, the process's peak RSS elsewhere."""
    if device.type == "cuda" and torch.cuda.is_available():
        return PEAK_ACCELERATOR_MEMORY, torch.cuda.max_memory_allocated(device) / 1e9
    if device.type == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available():
        return PEAK_ACCELERATOR_MEMORY, torch.xpu.max_memory_allocated(device) / 1e9
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return PEAK_RSS, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


class ThroughputCallback(TrainerCallback):
    """Adds ``tokens_per_second``, ``step_time_s`` and peak memory to each training log.

    Values cover the window since the previous training log (or the start of training). Use
    :meth:`attach` to connect it to a trainer (``build_callback`` does).
    """

    def __init__(self) -> None:
        self._window_start = time.perf_counter()
        self._window_step = 0
        self._tokens_host = 0
        self._tokens_device: torch.Tensor | None = None

    # ---------------------------------------------------------------- wiring
    def attach(self, trainer: Any) -> None:
        """Count tokens through the trainer's microbatch observers and extend its ``log``."""
        if hasattr(trainer, "add_microbatch_observer"):
            trainer.add_microbatch_observer(self)
        # Training entries only (not eval or the final summary); see training_logs for why not on_log.
        extend_training_logs(trainer, lambda: self.collect(trainer.state.global_step, trainer.args.device))

    # ---------------------------------------------------------------- microbatch observer
    def before_microbatch(self, trainer: Any, inputs: dict[str, Any], num_items_in_batch: Any) -> None:
        mask = inputs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 2:
            # On-device running sum: no host-device sync per microbatch.
            total = mask.sum()
            self._tokens_device = total if self._tokens_device is None else self._tokens_device + total
            return
        ids = inputs.get("input_ids")
        if isinstance(ids, torch.Tensor):
            self._tokens_host += ids.numel()

    def after_microbatch(self, trainer: Any, inputs: dict[str, Any], loss: torch.Tensor) -> None:
        pass

    # ---------------------------------------------------------------- callback events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._reset(state.global_step)

    # ---------------------------------------------------------------- metrics
    def collect(self, global_step: int, device: torch.device) -> dict[str, float]:
        """Metrics for the window ending now; starts the next window."""
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        steps = max(global_step - self._window_step, 1)
        tokens = self._tokens_host
        if self._tokens_device is not None:
            tokens += int(self._tokens_device.item())
        key, memory = peak_memory_gb(torch.device(device))
        metrics = {
            TOKENS_PER_SECOND: round(tokens / elapsed, 2),
            STEP_TIME: round(elapsed / steps, 6),
            key: round(memory, 4),
        }
        self._reset(global_step)
        return metrics

    def _reset(self, global_step: int) -> None:
        self._window_start = time.perf_counter()
        self._window_step = global_step
        self._tokens_host = 0
        self._tokens_device = None


def build_callback(trainer: Any) -> ThroughputCallback | None:
    """The throughput callback, attached to ``trainer``, unless ``--throughput_logging false``."""
    if not getattr(trainer.args, "throughput_logging", True):
        return None
    callback = ThroughputCallback()
    callback.attach(trainer)
    return callback
