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

from torch import nn

from hf_gradext.integrations import peft as peft_integration


def is_lora_adapter(name: str, module: nn.Module) -> bool:
    """True for a peft ``lora_A.<adapter>`` / ``lora_B.<adapter>`` linear (by module name).

    The naming is peft's; :mod:`hf_gradext.integrations.peft` owns it and checks it against peft's own
    list of adapter module names, so a rename in peft stops the run instead of selecting nothing.
    """
    return peft_integration.is_lora_adapter(name, module)


def is_peft_model(model: nn.Module) -> bool:
    """True for a ``peft.PeftModel``."""
    return peft_integration.is_peft_model(model)
