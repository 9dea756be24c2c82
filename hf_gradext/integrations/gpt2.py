"""transformers internals the GPT-2 patches rely on, each checked once.

Mask cache:

* ``masking_utils.create_causal_mask``: takes ``config, inputs_embeds, attention_mask, position_ids``
  and the KV cache under the name ``past_key_values`` (transformers 5.23) or ``cache`` (5.24; 5.25 also
  accepts ``past_key_values`` as a deprecated keyword-only alias, which does not count as a second name);
* ``modeling_gpt2.create_causal_mask``: the module attribute ``GPT2Model.forward`` looks the function up
  through (so replacing it there reroutes GPT-2's mask creation and nothing else);
* ``GPT2Model.forward``: ``(input_ids, <cache>, ...)`` with ``position_ids`` and ``inputs_embeds``, where
  ``<cache>`` is the same name as above.

Patched model classes (:mod:`hf_gradext.patches.gpt2_models`): ``post_init`` / ``_init_weights`` /
``is_custom_code`` of ``PreTrainedModel``, ``transformers.initialization.normal_``, and the layout
``GPT2LMHeadModel.__init__`` has built when it calls ``post_init``.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from hf_gradext.integrations.guard import check_once, missing_parameters

CACHE_NAMES = ("past_key_values", "cache")
PACKAGE = "transformers"


def _cache_name(func: Any) -> str | None:
    """The one KV-cache parameter that can be passed by position, or None when there is not exactly one.

    A keyword-only alias (transformers 5.25 keeps ``past_key_values`` that way while it is deprecated)
    is not the parameter GPT-2 passes, so it does not count.
    """
    params = inspect.signature(func).parameters
    found = [
        name
        for name in CACHE_NAMES
        if name in params and params[name].kind is not inspect.Parameter.KEYWORD_ONLY
    ]
    return found[0] if len(found) == 1 else None


def create_causal_mask_cache_name() -> str:
    """Name of the KV-cache parameter of ``masking_utils.create_causal_mask`` (checked)."""
    from transformers import masking_utils

    def check() -> str | None:
        func = getattr(masking_utils, "create_causal_mask", None)
        problem = missing_parameters(func, ("config", "inputs_embeds", "attention_mask", "position_ids"))
        if problem:
            return f"masking_utils.create_causal_mask: {problem}"
        if _cache_name(func) is None:
            return "masking_utils.create_causal_mask does not take exactly one of past_key_values / cache by position"
        return None

    check_once("masking_utils.create_causal_mask", PACKAGE, check)
    return _cache_name(masking_utils.create_causal_mask)


def gpt2_forward_cache_name() -> str:
    """Name of ``GPT2Model.forward``'s KV-cache parameter; checks it is the second one (after input_ids)."""
    from transformers.models.gpt2 import modeling_gpt2

    def check() -> str | None:
        forward = modeling_gpt2.GPT2Model.forward
        problem = missing_parameters(
            forward, ("input_ids", "position_ids", "inputs_embeds", "attention_mask")
        )
        if problem:
            return f"GPT2Model.forward: {problem}"
        names = [n for n in inspect.signature(forward).parameters if n != "self"]
        if names[:1] != ["input_ids"] or len(names) < 2 or names[1] not in CACHE_NAMES:
            return f"GPT2Model.forward starts with {names[:2]}, not (input_ids, past_key_values|cache)"
        inner = inspect.unwrap(forward)
        if "create_causal_mask" not in inner.__code__.co_names:
            return "GPT2Model.forward no longer calls the module-level create_causal_mask"
        if not callable(getattr(modeling_gpt2, "create_causal_mask", None)):
            return "modeling_gpt2.create_causal_mask does not exist"
        return None

    check_once("GPT2Model.forward", PACKAGE, check)
    names = [n for n in inspect.signature(modeling_gpt2.GPT2Model.forward).parameters if n != "self"]
    return names[1]


def check_mask_cache_touchpoints() -> None:
    """All checks of the mask cache; raises IntegrationError on the first broken assumption."""
    mask_name = create_causal_mask_cache_name()
    forward_name = gpt2_forward_cache_name()

    def same() -> str | None:
        if mask_name != forward_name:
            return f"create_causal_mask calls its cache {mask_name!r} but GPT2Model.forward {forward_name!r}"
        return None

    check_once("GPT2Model.forward/create_causal_mask cache name", PACKAGE, same)


def check_construction_touchpoints() -> None:
    """What the patched GPT-2 classes override or call while they are built (checked once).

    ``post_init()`` (runs weight init after the submodules exist), ``_init_weights(module)`` (per-module
    init, children before parents), ``is_custom_code()`` (overridden: native init) and ``transformers.initialization.normal_(tensor, mean, std)`` (the
    init that skips weights ``from_pretrained`` already loaded).
    """
    from transformers import initialization
    from transformers.models.gpt2 import modeling_gpt2

    def check() -> str | None:
        cls = modeling_gpt2.GPT2PreTrainedModel
        for name, params in (("post_init", ()), ("_init_weights", ("module",))):
            problem = missing_parameters(getattr(cls, name, None), params)
            if problem:
                return f"GPT2PreTrainedModel.{name}: {problem}"
        if not callable(getattr(cls, "is_custom_code", None)):
            return "PreTrainedModel.is_custom_code (the patched classes declare themselves native) is gone"
        problem = missing_parameters(getattr(initialization, "normal_", None), ("tensor", "mean", "std"))
        if problem:
            return f"transformers.initialization.normal_: {problem}"
        return None

    check_once("GPT2PreTrainedModel.post_init/_init_weights", PACKAGE, check)


def check_lm_head_layout(model: Any) -> None:
    """``GPT2LMHeadModel.__init__`` has built ``transformer`` (a ``GPT2Model``) and ``lm_head`` by the time it
    calls ``post_init`` (the patched head swaps modules inside ``transformer`` there)."""
    from transformers.models.gpt2 import modeling_gpt2

    def check() -> str | None:
        if not isinstance(getattr(model, "transformer", None), modeling_gpt2.GPT2Model):
            return "GPT2LMHeadModel.__init__ calls post_init without a GPT2Model at .transformer"
        if not isinstance(getattr(model, "lm_head", None), nn.Module):
            return "GPT2LMHeadModel.__init__ calls post_init without an .lm_head module"
        return None

    check_once("GPT2LMHeadModel.__init__ layout", PACKAGE, check)


def init_normal_(tensor: Any, std: float, mean: float = 0.0) -> None:
    """``transformers.initialization.normal_`` (checked by :func:`check_construction_touchpoints`)."""
    from transformers import initialization

    check_construction_touchpoints()
    initialization.normal_(tensor, mean=mean, std=std)
