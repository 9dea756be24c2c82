"""Patched GPT-2 model classes, built from :class:`~hf_gradext.patches.gpt2_config.GPT2GradExtConfig`.

``GradExtGPT2Model`` / ``GradExtGPT2LMHeadModel`` subclass transformers' classes and change nothing in
them: stock GPT-2 models in the same process are untouched. :func:`register_auto_classes` (run when
:mod:`hf_gradext.patches` is imported) adds them to ``AutoConfig`` / ``AutoModel`` /
``AutoModelForCausalLM`` under ``model_type="gpt2_gradext"``, so ``AutoModelForCausalLM.from_pretrained``,
``from_config`` and ``GradExtGPT2LMHeadModel(config)`` all build the patched architecture.

Construction: transformers builds the stock submodules, then calls ``post_init``, which initializes the
weights (and which ``from_pretrained`` runs on the meta device before loading). The patched
``post_init`` swaps LayerNorm -> RMSNorm / GELU MLP -> SwiGLU *first*, so weight init, loading and
missing-weight init all see the final modules; building the stock modules first costs nothing under
``from_pretrained`` (meta device) and keeps transformers' own ``__init__`` (whatever it adds in a later
release) instead of a copy of it.

The class-level form (:func:`install_class_level_patches`, what ``apply_gradext_to_gpt2(model=None)``
calls) is an explicit, process-wide opt-in in the Liger style: stock ``GPT2Model`` / ``GPT2LMHeadModel``
built afterwards are retyped to the patched classes. ``import hf_gradext`` installs nothing of the kind.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GPT2LMHeadModel, GPT2Model
from transformers.models.gpt2.modeling_gpt2 import GPT2PreTrainedModel

from hf_gradext.integrations import gpt2 as touchpoints
from hf_gradext.patches import gpt2_config
from hf_gradext.patches.gpt2_config import MODEL_TYPE, GPT2GradExtConfig, resolve_flags
from hf_gradext.patches.gpt2_modules import swap_gpt2_modules


def _init_swiglu(config: Any, module: nn.Module) -> None:
    """GPT-2's residual-scaled init for the SwiGLU down projection (as for ``GPT2MLP.c_proj``).

    Keyed on the projection itself, after its plain Linear init, not on the parent MLP: transformers skips
    the init of a parameter-less module in classes defined outside transformers ("custom code").
    """
    if isinstance(module, nn.Linear) and getattr(module, "gradext_residual_projection", False):
        std = config.initializer_range / math.sqrt(2 * config.n_layer)
        touchpoints.init_normal_(module.weight, std=std)


def _patch_modules(gpt2: GPT2Model) -> None:
    """Swap the modules ``gpt2.config`` asks for and make ``gpt2`` a :class:`GradExtGPT2Model`."""
    rms_norm, swiglu, hidden = resolve_flags(gpt2.config)
    if rms_norm or swiglu:
        swap_gpt2_modules(gpt2, rms_norm, swiglu, hidden)
    if type(gpt2) is GPT2Model:
        gpt2.__class__ = GradExtGPT2Model  # its _init_weights then covers the SwiGLU down projection


class _NativeGPT2Init:
    """What both patched classes share: their config class and native GPT-2 weight init."""

    config_class = GPT2GradExtConfig

    @classmethod
    def is_custom_code(cls) -> bool:
        """``False``: initialize as native GPT-2. transformers treats classes defined outside it as custom
        code and then skips the init of parameter-less modules, e.g. ``GPT2Attention``'s residual-scaled
        ``c_proj`` (checked: :func:`hf_gradext.integrations.gpt2.check_construction_touchpoints`)."""
        return False

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # type: ignore[misc]
        _init_swiglu(self.config, module)  # type: ignore[attr-defined]


class GradExtGPT2Model(_NativeGPT2Init, GPT2Model):
    """``GPT2Model`` with the norms / MLPs its :class:`GPT2GradExtConfig` asks for."""

    def post_init(self) -> None:
        touchpoints.check_construction_touchpoints()
        _patch_modules(self)
        super().post_init()


class GradExtGPT2LMHeadModel(_NativeGPT2Init, GPT2LMHeadModel):
    """``GPT2LMHeadModel`` whose ``transformer`` is a :class:`GradExtGPT2Model`."""

    def post_init(self) -> None:
        touchpoints.check_construction_touchpoints()
        touchpoints.check_lm_head_layout(self)
        _patch_modules(self.transformer)
        super().post_init()


# Stock class -> patched class, for retyping an existing model (apply_gradext_to_gpt2(model=...)).
PATCHED_CLASSES: dict[type, type] = {GPT2Model: GradExtGPT2Model, GPT2LMHeadModel: GradExtGPT2LMHeadModel}


def register_auto_classes() -> None:
    """Register ``gpt2_gradext`` with AutoConfig / AutoModel / AutoModelForCausalLM (idempotent).

    Registry entries only; no transformers class is changed. Another class already registered under
    ``gpt2_gradext`` makes transformers raise (it is not silently replaced).
    """
    try:
        registered = AutoConfig.for_model(MODEL_TYPE).__class__
    except ValueError:
        registered = None
    if registered is not GPT2GradExtConfig:
        AutoConfig.register(MODEL_TYPE, GPT2GradExtConfig)
    for auto, model_class in ((AutoModel, GradExtGPT2Model), (AutoModelForCausalLM, GradExtGPT2LMHeadModel)):
        mapping = getattr(auto, "_model_mapping", {})
        try:
            current = mapping[GPT2GradExtConfig]
        except KeyError:
            current = None
        if current is not model_class:
            auto.register(GPT2GradExtConfig, model_class)


def retype_model(model: nn.Module) -> None:
    """Make an existing (already swapped) GPT-2 model and its config the patched classes, in place.

    Raises:
        TypeError: a GPT-2 head without a patched class (only ``GPT2Model`` / ``GPT2LMHeadModel``).
    """
    patched = PATCHED_CLASSES.get(type(model))
    if patched is None and type(model) not in PATCHED_CLASSES.values():
        raise TypeError(type(model).__name__)
    for module in model.modules():
        if type(module) in PATCHED_CLASSES:
            module.__class__ = PATCHED_CLASSES[type(module)]


# --------------------------------------------------------------------------- class-level form
_MISSING = object()
# GPT2PreTrainedModel's own post_init entry before the hook (_MISSING: inherited from PreTrainedModel).
_saved_post_init: list[Any] = []


def _class_level_post_init(self: GPT2PreTrainedModel) -> None:
    patched = PATCHED_CLASSES.get(type(self))
    defaults = gpt2_config.class_defaults()
    if patched is not None and defaults:
        if not isinstance(self.config, GPT2GradExtConfig):  # a patched config states its own choice
            gpt2_config.to_gradext_config(
                self.config,
                bool(defaults.get(gpt2_config.RMS_NORM_KEY)),
                bool(defaults.get(gpt2_config.SWIGLU_KEY)),
                defaults.get(gpt2_config.SWIGLU_HIDDEN_KEY),
            )
        self.__class__ = patched
        patched.post_init(self)  # swaps, then (through super) back here with a patched type
        return
    own = _saved_post_init[0] if _saved_post_init else _MISSING
    if own is _MISSING:
        super(GPT2PreTrainedModel, self).post_init()
    else:
        own(self)


def install_class_level_patches(rms_norm: bool, swiglu: bool, swiglu_hidden_size: int | None) -> None:
    """Stock ``GPT2Model`` / ``GPT2LMHeadModel`` built from now on get these patches (explicit opt-in).

    ``rms_norm=swiglu=False`` removes the hook again. Idempotent.
    """
    if not (rms_norm or swiglu):
        uninstall_class_level_patches()
        return
    gpt2_config.set_class_defaults(rms_norm, swiglu, swiglu_hidden_size)
    if _saved_post_init:
        return
    touchpoints.check_construction_touchpoints()
    _saved_post_init.append(vars(GPT2PreTrainedModel).get("post_init", _MISSING))
    GPT2PreTrainedModel.post_init = _class_level_post_init


def uninstall_class_level_patches() -> None:
    """Restore transformers' ``post_init`` and forget the class defaults (idempotent)."""
    gpt2_config.set_class_defaults(False, False, None)
    if not _saved_post_init:
        return
    saved = _saved_post_init.pop()
    if saved is _MISSING:
        del GPT2PreTrainedModel.post_init
    else:
        GPT2PreTrainedModel.post_init = saved


def class_level_patches_installed() -> bool:
    return bool(_saved_post_init)
