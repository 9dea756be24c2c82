"""The config of patched GPT-2 models: ``model_type="gpt2_gradext"``.

RMSNorm and SwiGLU change GPT-2's parameters, so a patched checkpoint must never be read as stock GPT-2
(transformers would fill the MLPs with random weights and only warn about missing keys). It gets a
``model_type`` of its own, as HF does for every architecture: :class:`GPT2GradExtConfig` subclasses
``GPT2Config`` with three fields (``gradext_rms_norm``, ``gradext_swiglu``,
``gradext_swiglu_hidden_size``) that ``save_pretrained`` writes to ``config.json``. The classes that
build from it live in :mod:`hf_gradext.patches.gpt2_models`; both are registered with the Auto classes
when :mod:`hf_gradext.patches` is imported (registry entries only, no transformers class is changed).

A process without hf_gradext cannot load such a checkpoint and says so (transformers: "model type
``gpt2_gradext`` ... not recognized"); checkpoints saved by earlier hf_gradext versions as ``gpt2`` are
refused until migrated (:mod:`hf_gradext.patches.migration`).

The mask cache changes no parameter and no output, so it stays an optional key
(``gradext_causal_mask_cache``) that stock GPT-2 configs may carry too.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import GPT2Config

from hf_gradext.patches.swiglu import default_swiglu_hidden_size

MODEL_TYPE = "gpt2_gradext"
GPT2_MODEL_TYPES = ("gpt2", MODEL_TYPE)
RMS_NORM_KEY = "gradext_rms_norm"
SWIGLU_KEY = "gradext_swiglu"
SWIGLU_HIDDEN_KEY = "gradext_swiglu_hidden_size"

# Set by the class-level form of apply_gradext_to_gpt2 (model=None): the patches for stock GPT-2 configs
# built into models from then on (hf_gradext.patches.gpt2_models.install_class_level_patches).
_class_defaults: dict[str, Any] = {}


@strict
class GPT2GradExtConfig(GPT2Config):
    """``GPT2Config`` plus the architecture patches; ``model_type="gpt2_gradext"``.

    Args (beyond ``GPT2Config``'s):
        gradext_rms_norm: every LayerNorm is an RMSNorm (no bias).
        gradext_swiglu: every MLP is a SwiGLU (``gate_proj``, ``up_proj``, ``down_proj``, no bias).
        gradext_swiglu_hidden_size: SwiGLU width; ``None`` = ``round(8 n_embd / 3)`` (GELU MLP's weight
            count), resolved and recorded at construction so a reload never re-derives it.
    """

    model_type = MODEL_TYPE

    gradext_rms_norm: bool = False
    gradext_swiglu: bool = False
    gradext_swiglu_hidden_size: int | None = None


def is_gpt2_config(config: Any) -> bool:
    """Stock or patched GPT-2 (the models the GPT-2 patches and GPT-2 specific choices apply to)."""
    return getattr(config, "model_type", None) in GPT2_MODEL_TYPES


def set_class_defaults(rms_norm: bool, swiglu: bool, swiglu_hidden_size: int | None) -> None:
    """Patches for stock-config GPT-2 models constructed from now on (class-level form)."""
    _class_defaults.clear()
    if rms_norm:
        _class_defaults[RMS_NORM_KEY] = True
    if swiglu:
        _class_defaults[SWIGLU_KEY] = True
        if swiglu_hidden_size is not None:
            _class_defaults[SWIGLU_HIDDEN_KEY] = swiglu_hidden_size


def class_defaults() -> dict[str, Any]:
    return dict(_class_defaults)


def resolve_flags(config: Any) -> tuple[bool, bool, int | None]:
    """``(rms_norm, swiglu, swiglu_hidden_size)`` a config asks for; records the resolved width."""
    rms_norm = bool(getattr(config, RMS_NORM_KEY, False))
    swiglu = bool(getattr(config, SWIGLU_KEY, False))
    hidden = None
    if swiglu:
        hidden = getattr(config, SWIGLU_HIDDEN_KEY, None) or default_swiglu_hidden_size(config.hidden_size)
        setattr(config, SWIGLU_HIDDEN_KEY, hidden)
    return rms_norm, swiglu, hidden


def to_gradext_config(config: Any, rms_norm: bool, swiglu: bool, swiglu_hidden_size: int | None) -> None:
    """Turn a GPT-2 config into a :class:`GPT2GradExtConfig` in place, adding the patches switched on.

    In place (not a copy) because the model and its submodels share one config object. A
    ``GPT2GradExtConfig`` has exactly ``GPT2Config``'s fields plus three with defaults, so retyping the
    object is complete: nothing is lost, and ``model_type`` (a class attribute) becomes ``gpt2_gradext``.
    """
    if not isinstance(config, GPT2GradExtConfig):
        if not isinstance(config, GPT2Config):
            raise TypeError(f"expected a GPT2Config, got {type(config).__name__}")
        config.__class__ = GPT2GradExtConfig
    if rms_norm:
        config.gradext_rms_norm = True
    if swiglu:
        config.gradext_swiglu = True
        config.gradext_swiglu_hidden_size = swiglu_hidden_size
