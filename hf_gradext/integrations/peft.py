"""What hf_gradext assumes of peft, checked before first use.

* **Adapter naming.** Per-sample capture selects LoRA adapters by module name: peft's LoRA layers keep
  their adapter linears in ``ModuleDict``\\ s named ``lora_A`` / ``lora_B`` (``<layer>.lora_A.<adapter>``).
  If peft renamed them, the ``lora`` group would silently select nothing (or the dense default would
  apply); the names are checked against ``LoraLayer.adapter_layer_names``, peft's own list.
* **``PeftModel.get_base_model``**: the wrapped transformers model (its config and loss function).
* **LoRA layers** (``peft.tuners.lora.LoraLayer``): whether a model carries LoRA adapters, either as a
  ``PeftModel`` or injected into a transformers model (``model.add_adapter``). hf_gradext used to test
  ``hasattr(model, "peft_config")``; asking for LoRA layers answers the question actually meant
  ("should the default layer selection be the adapters?") without relying on that attribute.

Nothing here imports peft unless peft is already imported: a model can only be a peft model (or
carry peft layers) once peft has been imported, and non-peft runs should not pay for the import.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from torch import nn

from hf_gradext.integrations.guard import check_once, missing_parameters

PACKAGE = "peft"
ADAPTER_NAMING = "LoraLayer.adapter_layer_names"
GET_BASE_MODEL = "PeftModel.get_base_model"
LORA_LAYER = "peft.tuners.lora.LoraLayer"

# The ModuleDicts of a LoRA layer that hold the per-adapter nn.Linear modules hf_gradext hooks.
LORA_LINEAR_CONTAINERS: tuple[str, ...] = ("lora_A", "lora_B")
_ADAPTER = re.compile(r"(^|\.)(" + "|".join(LORA_LINEAR_CONTAINERS) + r")(\.|$)")


def _peft_loaded() -> bool:
    return "peft" in sys.modules


def _check_adapter_naming() -> str | None:
    from peft.tuners.lora import LoraLayer

    names = getattr(LoraLayer, "adapter_layer_names", None)
    if names is None:
        return "LoraLayer.adapter_layer_names does not exist"
    missing = [n for n in LORA_LINEAR_CONTAINERS if n not in names]
    if missing:
        return (
            f"LoRA adapter modules are no longer named {', '.join(missing)} (peft lists {', '.join(names)})"
        )
    return None


def is_lora_adapter(name: str, module: nn.Module) -> bool:
    """True for a peft ``lora_A.<adapter>`` / ``lora_B.<adapter>`` linear (by module name)."""
    if _peft_loaded():
        check_once(ADAPTER_NAMING, PACKAGE, _check_adapter_naming)
    return isinstance(module, nn.Linear) and _ADAPTER.search(name) is not None


def is_peft_model(model: Any) -> bool:
    """True for a ``peft.PeftModel`` (peft not imported: it cannot be one)."""
    if not _peft_loaded():
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _check_get_base_model() -> str | None:
    from peft import PeftModel

    return missing_parameters(getattr(PeftModel, "get_base_model", None), [])


def base_model(model: Any) -> Any:
    """The transformers model inside a ``PeftModel``; any other model as it is."""
    if not is_peft_model(model):
        return model
    check_once(GET_BASE_MODEL, PACKAGE, _check_get_base_model)
    return model.get_base_model()


def _check_lora_layer() -> str | None:
    from peft.tuners import lora

    layer = getattr(lora, "LoraLayer", None)
    if not isinstance(layer, type):
        return "peft.tuners.lora.LoraLayer is not a class"
    return None


def has_lora_layers(model: nn.Module) -> bool:
    """Whether ``model`` carries peft LoRA layers (a ``PeftModel`` or adapters injected by transformers)."""
    if not _peft_loaded():
        return False
    check_once(LORA_LAYER, PACKAGE, _check_lora_layer)
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


def check_all() -> None:
    """Every check of this module (imports peft)."""
    import peft  # noqa: F401  (the checks below only run once peft is imported)

    check_once(ADAPTER_NAMING, PACKAGE, _check_adapter_naming)
    check_once(GET_BASE_MODEL, PACKAGE, _check_get_base_model)
    check_once(LORA_LAYER, PACKAGE, _check_lora_layer)
