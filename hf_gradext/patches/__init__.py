"""Architecture patches (Liger-Kernel style), dispatched by ``config.model_type``.

Importing this package (``import hf_gradext`` does) registers patched GPT-2's ``model_type``
(``gpt2_gradext``) with transformers' Auto classes, so saved RMSNorm/SwiGLU checkpoints rebuild through
``AutoModelForCausalLM.from_pretrained``. It changes no transformers class: registry entries only.
"""

from __future__ import annotations

from typing import Any

from hf_gradext.patches.gpt2 import apply_gradext_to_gpt2
from hf_gradext.patches.gpt2_config import GPT2GradExtConfig, is_gpt2_config
from hf_gradext.patches.gpt2_models import GradExtGPT2LMHeadModel, GradExtGPT2Model, register_auto_classes
from hf_gradext.patches.mask_cache import clear_mask_cache, mask_cache_info
from hf_gradext.patches.migration import check_not_legacy_checkpoint, migrate_checkpoint
from hf_gradext.patches.registry import apply_gradext

register_auto_classes()


def apply_from_args(args: Any, model: Any) -> Any:
    """Apply the patches the ``GradExtArguments`` flags ask for to a freshly built/loaded model.

    Called by ``hf_gradext.train`` right after the model is loaded or built (before peft wraps it);
    returns the model to use. ``--gpt2_causal_mask_cache`` unset means "on for GPT-2, nothing
    otherwise"; an explicit patch flag on a model without patches is a ``UserFacingError``.
    """
    config = getattr(model, "config", None)
    check_not_legacy_checkpoint(config)
    causal = getattr(args, "gpt2_causal_mask_cache", None)
    flags = {
        "rms_norm": bool(getattr(args, "gpt2_rms_norm", False)),
        "swiglu": bool(getattr(args, "gpt2_swiglu", False)),
        "swiglu_hidden_size": getattr(args, "swiglu_hidden_size", None),
    }
    if is_gpt2_config(config):
        return apply_gradext(model, causal_mask_cache=True if causal is None else causal, **flags)
    return apply_gradext(model, causal_mask_cache=causal, **flags)


__all__ = [
    "GPT2GradExtConfig",
    "GradExtGPT2LMHeadModel",
    "GradExtGPT2Model",
    "apply_from_args",
    "apply_gradext",
    "apply_gradext_to_gpt2",
    "clear_mask_cache",
    "mask_cache_info",
    "migrate_checkpoint",
]
