"""Config-driven construction of patched GPT-2 models.

The patch choices live in the model config (``gradext_rms_norm``, ``gradext_swiglu``,
``gradext_swiglu_hidden_size``), so ``save_pretrained`` writes them to ``config.json``.
:func:`install_construction_hooks` (run when ``hf_gradext.patches`` is imported, i.e. on
``import hf_gradext``) wraps two ``GPT2PreTrainedModel`` methods:

* ``post_init``: a ``GPT2Model`` whose config asks for the patches gets its modules swapped *before*
  transformers initializes weights, so ``GPT2LMHeadModel(config)`` and
  ``AutoModelForCausalLM.from_pretrained(saved_dir)`` both rebuild the patched architecture;
* ``_init_weights``: the SwiGLU down projection gets GPT-2's residual-scaled init
  (``initializer_range / sqrt(2 n_layer)``), as ``GPT2MLP.c_proj`` does.

A config without these keys builds stock GPT-2, unless :func:`set_class_defaults` (the class-level
form of ``apply_gradext_to_gpt2``) asked for patches; then the defaults are written into the config.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import initialization as init
from transformers.models.gpt2.modeling_gpt2 import GPT2Model, GPT2PreTrainedModel

from hf_gradext.patches.gpt2_modules import swap_gpt2_modules
from hf_gradext.patches.swiglu import GradExtSwiGLUMLP, default_swiglu_hidden_size

RMS_NORM_KEY = "gradext_rms_norm"
SWIGLU_KEY = "gradext_swiglu"
SWIGLU_HIDDEN_KEY = "gradext_swiglu_hidden_size"

# Set by the class-level form of apply_gradext_to_gpt2 (model=None); consulted for configs that do
# not state the patches themselves.
_class_defaults: dict[str, Any] = {}
_originals: dict[str, Any] = {}


def set_class_defaults(rms_norm: bool, swiglu: bool, swiglu_hidden_size: int | None) -> None:
    """Patches for GPT-2 models constructed from now on whose config does not state them."""
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
    """``(rms_norm, swiglu, swiglu_hidden_size)`` for ``config``; writes class defaults into it."""
    for key, value in _class_defaults.items():
        if getattr(config, key, None) is None:
            setattr(config, key, value)
    rms_norm = bool(getattr(config, RMS_NORM_KEY, False))
    swiglu = bool(getattr(config, SWIGLU_KEY, False))
    hidden = None
    if swiglu:
        hidden = getattr(config, SWIGLU_HIDDEN_KEY, None) or default_swiglu_hidden_size(config.hidden_size)
        setattr(config, SWIGLU_HIDDEN_KEY, hidden)  # recorded so a reload never re-derives it
    return rms_norm, swiglu, hidden


def record_flags(config: Any, rms_norm: bool, swiglu: bool, swiglu_hidden_size: int | None) -> None:
    """Write patches applied to an existing model into its config (only the ones switched on)."""
    if rms_norm:
        setattr(config, RMS_NORM_KEY, True)
    if swiglu:
        setattr(config, SWIGLU_KEY, True)
        setattr(config, SWIGLU_HIDDEN_KEY, swiglu_hidden_size)


def _post_init(self: GPT2PreTrainedModel) -> None:
    if isinstance(self, GPT2Model):
        rms_norm, swiglu, hidden = resolve_flags(self.config)
        if rms_norm or swiglu:
            swap_gpt2_modules(self, rms_norm, swiglu, hidden)
    _originals["post_init"](self)


def _init_weights(self: GPT2PreTrainedModel, module: Any) -> None:
    _originals["_init_weights"](self, module)
    if isinstance(module, GradExtSwiGLUMLP):
        # Children are initialized before parents, so this overrides the plain Linear init.
        std = self.config.initializer_range / math.sqrt(2 * self.config.n_layer)
        init.normal_(module.down_proj.weight, mean=0.0, std=std)


def install_construction_hooks() -> None:
    """Idempotent; a no-op for configs that ask for no patch."""
    if _originals:
        return
    from hf_gradext.integrations.gpt2 import check_construction_touchpoints

    check_construction_touchpoints()
    # Look up through the MRO: post_init is PreTrainedModel's, _init_weights GPT2PreTrainedModel's.
    _originals["post_init"] = GPT2PreTrainedModel.post_init
    _originals["_init_weights"] = GPT2PreTrainedModel._init_weights
    GPT2PreTrainedModel.post_init = _post_init
    GPT2PreTrainedModel._init_weights = _init_weights
