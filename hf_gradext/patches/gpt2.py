"""``apply_gradext_to_gpt2``: causal-mask caching, RMSNorm and SwiGLU for HF GPT-2 (Liger style).

* ``model=...`` (instance level): the modules of that model are swapped in place; with RMSNorm or SwiGLU
  the model becomes a ``GradExtGPT2LMHeadModel`` / ``GradExtGPT2Model`` and its config a
  ``GPT2GradExtConfig`` (``model_type="gpt2_gradext"``), so ``save_pretrained`` writes a checkpoint that
  ``AutoModelForCausalLM.from_pretrained`` (after ``import hf_gradext``) rebuilds exactly, and that no
  process can load as stock GPT-2. New weights are listed in a warning (a stock checkpoint patched with
  ``rms_norm`` / ``swiglu`` is no longer the pretrained function until it is trained). Other models in
  the process are untouched.
* ``model=None`` (class level, an explicit process-wide opt-in): stock ``GPT2Model`` /
  ``GPT2LMHeadModel`` built afterwards (``GPT2LMHeadModel(config)``, ``from_pretrained``) get the
  patches (:func:`~hf_gradext.patches.gpt2_models.install_class_level_patches`); all flags off undoes it.

The mask cache changes no output and is switched on per model (:mod:`hf_gradext.patches.mask_cache`);
alone it keeps ``model_type="gpt2"``.
"""

from __future__ import annotations

import logging

from torch import nn
from transformers.models.gpt2.modeling_gpt2 import GPT2Model

from hf_gradext.errors import UserFacingError
from hf_gradext.patches import gpt2_config, gpt2_models, mask_cache
from hf_gradext.patches.gpt2_modules import summarize_names, swap_gpt2_modules
from hf_gradext.patches.swiglu import GradExtSwiGLUMLP, default_swiglu_hidden_size

logger = logging.getLogger(__name__)


def _check_hidden_size(swiglu: bool, swiglu_hidden_size: int | None) -> None:
    if swiglu_hidden_size is None:
        return
    if not swiglu:
        raise UserFacingError(
            "--swiglu_hidden_size only applies with --gpt2_swiglu; add --gpt2_swiglu or drop it"
        )
    if (
        isinstance(swiglu_hidden_size, bool)
        or not isinstance(swiglu_hidden_size, int)
        or swiglu_hidden_size <= 0
    ):
        raise UserFacingError(
            f"--swiglu_hidden_size must be a positive integer, got {swiglu_hidden_size!r}; "
            "leave it unset to keep the GELU MLP's weight count"
        )


def _gpt2_models(model: nn.Module) -> list[GPT2Model]:
    return [m for m in model.modules() if isinstance(m, GPT2Model)]


def apply_gradext_to_gpt2(
    causal_mask_cache: bool = True,
    rms_norm: bool = False,
    swiglu: bool = False,
    swiglu_hidden_size: int | None = None,
    model: nn.Module | None = None,
) -> nn.Module | None:
    """Apply the GPT-2 patches to the classes (``model=None``) or to an existing ``model``.

    Args:
        causal_mask_cache: route mask creation through the cache (outputs unchanged). With ``model``
            only that model's configs record the choice (``gradext_causal_mask_cache``; other models in
            the process keep transformers' mask creation); with ``model=None`` it is the default for
            models whose config states no choice, and ``False`` restores transformers' own function.
        rms_norm: replace every ``nn.LayerNorm`` (``ln_1``, ``ln_2``, ``ln_f``) by
            :class:`~hf_gradext.patches.rms_norm.GradExtRMSNorm`; an existing model keeps its gammas
            as RMSNorm scales and loses the LayerNorm biases.
        swiglu: replace every ``GPT2MLP`` by :class:`~hf_gradext.patches.swiglu.GradExtSwiGLUMLP`
            (freshly initialized on an existing model).
        swiglu_hidden_size: SwiGLU width; default keeps the GELU MLP's weight count (``round(8d/3)``).
        model: a GPT-2 model (any head) to patch in place; ``None`` patches the classes.

    Returns:
        ``model`` (patched) or ``None`` in the class-level form.

    Raises:
        UserFacingError: ``model`` is not GPT-2, a bad ``swiglu_hidden_size``, or a model that already
            has a SwiGLU of another width.
    """
    _check_hidden_size(swiglu, swiglu_hidden_size)

    if model is None:
        # Class level: models built from now on whose config states no choice follow this one.
        if causal_mask_cache:
            mask_cache.install_mask_cache()
        else:
            mask_cache.uninstall_mask_cache()
        gpt2_models.install_class_level_patches(rms_norm, swiglu, swiglu_hidden_size)
        return None

    config = getattr(model, "config", None)
    if not gpt2_config.is_gpt2_config(config):
        raise UserFacingError(
            f"apply_gradext_to_gpt2 got a model of type {getattr(config, 'model_type', None)!r}; pass a GPT-2 "
            "model or use hf_gradext.patches.apply_gradext(model, ...) to dispatch by config.model_type"
        )
    if (rms_norm or swiglu) and not _has_patched_class(model):
        raise UserFacingError(
            f"RMSNorm/SwiGLU patches exist for GPT2LMHeadModel and GPT2Model, not {type(model).__name__}; "
            "load the model with AutoModelForCausalLM, or use only causal_mask_cache"
        )
    # Instance level: only this model's configs record the choice; other models are untouched.
    mask_cache.enable_for_model(model, causal_mask_cache)
    new: list[str] = []
    dropped: list[str] = []
    for gpt2 in _gpt2_models(model):
        if swiglu:
            hidden = swiglu_hidden_size or default_swiglu_hidden_size(gpt2.config.hidden_size)
            existing = [b.mlp for b in gpt2.h if isinstance(b.mlp, GradExtSwiGLUMLP)]
            if existing and existing[0].gate_proj.out_features != hidden:
                raise UserFacingError(
                    f"this GPT-2 model already has SwiGLU width {existing[0].gate_proj.out_features}, "
                    f"not {hidden}; drop --swiglu_hidden_size or start from a stock checkpoint"
                )
        else:
            hidden = None
        fresh = [b for b in gpt2.h if swiglu and not isinstance(b.mlp, GradExtSwiGLUMLP)]
        added, removed = swap_gpt2_modules(gpt2, rms_norm, swiglu, hidden)
        if rms_norm or swiglu:
            gpt2_config.to_gradext_config(gpt2.config, rms_norm, swiglu, hidden)
            gpt2_models.retype_model(model)
            # Same init as a freshly built patched model (GPT-2 scheme, residual-scaled down_proj); only
            # the MLPs created just now, children before parent as transformers does.
            for block in fresh:
                for module in (block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj, block.mlp):
                    model._init_weights(module)
        prefix = _prefix_of(model, gpt2)
        new += [prefix + n for n in added]
        dropped += [prefix + n for n in removed]
    if new or dropped:
        logger.warning(
            "hf_gradext GPT-2 patches changed the architecture of an existing model (rms_norm=%s, swiglu=%s): "
            "%d new parameters start from fresh initial values: %s; %d parameters were dropped: %s. "
            "Pretrained outputs are not preserved until the model is trained.",
            rms_norm,
            swiglu,
            len(new),
            summarize_names(new) or "none",
            len(dropped),
            summarize_names(dropped) or "none",
        )
    return model


def _has_patched_class(model: nn.Module) -> bool:
    classes = gpt2_models.PATCHED_CLASSES
    return type(model) in classes or type(model) in classes.values()


def _prefix_of(root: nn.Module, child: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is child:
            return f"{name}." if name else ""
    return ""
