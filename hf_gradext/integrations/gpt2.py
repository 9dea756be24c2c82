"""transformers internals the GPT-2 mask cache relies on, each checked once.

* ``masking_utils.create_causal_mask``: takes ``config, inputs_embeds, attention_mask, position_ids``
  and the KV cache under the name ``past_key_values`` (transformers 5.23) or ``cache`` (5.24);
* ``modeling_gpt2.create_causal_mask``: the module attribute ``GPT2Model.forward`` looks the function up
  through (so replacing it there reroutes GPT-2's mask creation and nothing else);
* ``GPT2Model.forward``: ``(input_ids, <cache>, ...)`` with ``position_ids`` and ``inputs_embeds``, where
  ``<cache>`` is the same name as above.
"""

from __future__ import annotations

import inspect
from typing import Any

from hf_gradext.integrations.guard import check_once, missing_parameters

CACHE_NAMES = ("past_key_values", "cache")
PACKAGE = "transformers"


def _cache_name(func: Any) -> str | None:
    params = inspect.signature(func).parameters
    found = [name for name in CACHE_NAMES if name in params]
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
            return "masking_utils.create_causal_mask takes neither past_key_values nor cache (exactly one expected)"
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
    """``GPT2PreTrainedModel.post_init`` / ``_init_weights`` (wrapped by the config-driven construction hooks)."""
    from transformers.models.gpt2 import modeling_gpt2

    def check() -> str | None:
        cls = modeling_gpt2.GPT2PreTrainedModel
        for name, params in (("post_init", ()), ("_init_weights", ("module",))):
            problem = missing_parameters(getattr(cls, name, None), params)
            if problem:
                return f"GPT2PreTrainedModel.{name}: {problem}"
        return None

    check_once("GPT2PreTrainedModel.post_init/_init_weights", PACKAGE, check)
