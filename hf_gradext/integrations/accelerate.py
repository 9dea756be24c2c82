"""The accelerate internals the GQC loop uses, each checked before first use.

* ``GradientState._set_sync_gradients``: HF's own epoch loop sets it per microbatch because it
  prefetches batches (accelerate cannot tell the last one of a window). The GQC loop sets it to True
  on every microbatch: each backward must all-reduce under DDP because the step decision needs the
  global gradient. If the setter stopped having an effect, DDP's ``no_sync`` bookkeeping and
  ``accelerator.sync_gradients`` would disagree with what the loop assumes, silently; the setter's
  effect is verified on every call (one attribute read) through the public ``accelerator.sync_gradients``.
* ``accelerate.data_loader.skip_first_batches``: the resume data skip, as in HF's loop.
* ``accelerate.utils.extract_model_from_parallel``: the model inside DDP / DeepSpeed / FSDP /
  ``torch.compile`` wrappers. (transformers' ``modeling_utils.unwrap_model`` wraps it but keeps a
  ``torch.compile`` wrapper, which hides the model's loss function; we ask for the bare model.)
"""

from __future__ import annotations

from typing import Any

from hf_gradext.integrations.guard import check_once, drift_error, missing_parameters

PACKAGE = "accelerate"
SYNC_GRADIENTS = "GradientState._set_sync_gradients"
SKIP_FIRST_BATCHES = "accelerate.data_loader.skip_first_batches"
EXTRACT_MODEL = "accelerate.utils.extract_model_from_parallel"


def _check_sync_setter() -> str | None:
    from accelerate.state import GradientState

    return missing_parameters(getattr(GradientState, "_set_sync_gradients", None), ["sync_gradients"])


def set_sync_gradients(accelerator: Any, value: bool) -> None:
    """Tell accelerate whether the coming backward ends a window (True: gradients are synchronized).

    Raises:
        IntegrationError: the private setter is gone or no longer changes ``accelerator.sync_gradients``.
    """
    check_once(SYNC_GRADIENTS, PACKAGE, _check_sync_setter)
    accelerator.gradient_state._set_sync_gradients(value)
    if accelerator.sync_gradients is not value:
        raise drift_error(
            SYNC_GRADIENTS,
            PACKAGE,
            f"setting it to {value} left accelerator.sync_gradients at {accelerator.sync_gradients}",
        )


def _check_skip_first_batches() -> str | None:
    from accelerate import data_loader

    return missing_parameters(getattr(data_loader, "skip_first_batches", None), ["dataloader", "num_batches"])


def skip_first_batches(dataloader: Any, num_batches: int) -> Any:
    """A dataloader that starts after ``num_batches`` batches (resume inside an epoch)."""
    check_once(SKIP_FIRST_BATCHES, PACKAGE, _check_skip_first_batches)
    from accelerate import data_loader

    return data_loader.skip_first_batches(dataloader, num_batches=num_batches)


def _check_extract_model() -> str | None:
    from accelerate import utils

    return missing_parameters(
        getattr(utils, "extract_model_from_parallel", None), ["model", "keep_torch_compile"]
    )


def unwrap_model(model: Any) -> Any:
    """The model inside distributed and ``torch.compile`` wrappers (peft models are kept as they are)."""
    check_once(EXTRACT_MODEL, PACKAGE, _check_extract_model)
    from accelerate import utils

    return utils.extract_model_from_parallel(model, keep_torch_compile=False)


def check_all() -> None:
    """Every check of this module that needs no accelerator instance."""
    check_once(SYNC_GRADIENTS, PACKAGE, _check_sync_setter)
    check_once(SKIP_FIRST_BATCHES, PACKAGE, _check_skip_first_batches)
    check_once(EXTRACT_MODEL, PACKAGE, _check_extract_model)
