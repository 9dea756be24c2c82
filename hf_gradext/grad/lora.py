"""peft LoRA layers: per-sample gradients of the adapter weights only.

peft's LoRA ``Linear`` computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` where ``lora_A[name]``
and ``lora_B[name]`` are plain ``nn.Linear`` modules and the base layer is frozen. Selection only picks
modules that directly own *trainable* parameters, so on a peft model the engine hooks exactly the
``lora_A.<adapter>`` / ``lora_B.<adapter>`` linears; their captured input already includes the LoRA
dropout and their output gradient already includes ``scaling``, so :func:`linear_math` is exact for them.

Variants that keep adapter weights in a ``ParameterDict`` used functionally (LoRA on embeddings, DoRA's
magnitude vector) are not hookable modules: selection reports them as unsupported instead of skipping them.
"""

from __future__ import annotations

import re

from torch import nn

_ADAPTER = re.compile(r"(^|\.)lora_[AB](\.|$)")


def is_lora_adapter(name: str, module: nn.Module) -> bool:
    """True for a peft ``lora_A.<adapter>`` / ``lora_B.<adapter>`` linear (by module name)."""
    return isinstance(module, nn.Linear) and _ADAPTER.search(name) is not None


def is_peft_model(model: nn.Module) -> bool:
    """True for a ``peft.PeftModel`` (checked by class hierarchy name, without importing peft)."""
    return any(c.__name__ == "PeftModel" for c in type(model).__mro__)
