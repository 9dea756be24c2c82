"""Which modules the capture engine hooks: groups, comma lists and regexes on module names.

Candidates are the modules that *directly* own at least one trainable parameter (so a peft model yields
only its LoRA adapters, and a frozen layer is never hooked). Names are those of the *unwrapped* model's
``named_modules()``: DDP / DataParallel / FSDP / ``torch.compile`` wrappers are looked through.

Groups:
    ``all``   every candidate;
    ``attn``  non-embedding, non-norm candidates under a module whose name contains ``attn``/``attention``;
    ``mlp``   the same under ``mlp``/``ffn``/``feed_forward``;
    ``embed`` embedding tables;  ``norm`` LayerNorm / RMSNorm;  ``lora`` peft LoRA A/B adapters.
Anything else in the comma list is a regular expression searched in the module name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from hf_gradext.errors import UserFacingError
from hf_gradext.grad.lora import is_lora_adapter
from hf_gradext.grad.registry import lookup

GROUPS = ("all", "attn", "mlp", "embed", "norm", "lora")
_WRAPPER_TYPES = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "OptimizedModule")
_WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
_ATTN = re.compile(r"attn|attention", re.IGNORECASE)
_MLP = re.compile(r"mlp|ffn|feed_?forward", re.IGNORECASE)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / FSDP / ``torch.compile`` wrappers (peft models are kept as they are)."""
    while type(model).__name__ in _WRAPPER_TYPES:
        inner = getattr(model, "module", None)
        model = inner if isinstance(inner, nn.Module) else model._orig_mod
    return model


def clean_name(name: str) -> str:
    """A module/parameter name without wrapper path components (``_fsdp_wrapped_module`` ...)."""
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_PARTS)


def trainable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules of the unwrapped model that directly own a parameter with ``requires_grad``."""
    root = unwrap_model(model)
    out: dict[str, nn.Module] = {}
    for name, module in root.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            out[clean_name(name)] = module
    return out


def module_groups(name: str, module: nn.Module) -> set[str]:
    """The groups (besides ``all``) a candidate module belongs to."""
    spec = lookup(module)
    family = spec.family if spec is not None else None
    groups = {"all"}
    if family == "embedding":
        groups.add("embed")
    elif family == "norm":
        groups.add("norm")
    else:
        parents = name.split(".")[:-1]
        if any(_ATTN.search(p) for p in parents):
            groups.add("attn")
        if any(_MLP.search(p) for p in parents):
            groups.add("mlp")
    if is_lora_adapter(name, module):
        groups.add("lora")
    return groups


def _tokens(layers: str | Iterable[str]) -> list[str]:
    parts = layers.split(",") if isinstance(layers, str) else list(layers)
    tokens = [t.strip() for t in parts if t.strip()]
    if not tokens:
        raise UserFacingError(
            "layer selection is empty; pass a group (all, attn, mlp, embed, norm) or a regex"
        )
    return tokens


def _describe(cands: dict[str, nn.Module]) -> str:
    counts = {g: 0 for g in GROUPS}
    for name, module in cands.items():
        for g in module_groups(name, module):
            counts[g] += 1
    names = list(cands)
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    groups = ", ".join(f"{g}={n}" for g, n in counts.items())
    return f"groups: {groups}; modules with trainable parameters: {shown}"


def select_modules(model: nn.Module, layers: str | Iterable[str] = "all") -> dict[str, nn.Module]:
    """Resolve a layer selection to ``{unwrapped module name: module}``, in ``named_modules`` order.

    Args:
        model: the model, possibly wrapped (DDP, FSDP, peft, ``torch.compile``).
        layers: ``"all"``, a group, a regex, or a comma list of those (union).

    Raises:
        UserFacingError: a token matches nothing (the message lists the groups and module names), or a
            regex does not compile.
    """
    cands = trainable_modules(model)
    if not cands:
        raise UserFacingError(
            "the model has no trainable parameters; unfreeze some before collecting gradients"
        )
    chosen: set[str] = set()
    for token in _tokens(layers):
        if token in GROUPS:
            hit = {n for n, m in cands.items() if token in module_groups(n, m)}
        else:
            try:
                rx = re.compile(token)
            except re.error as e:
                raise UserFacingError(
                    f"layer selection {token!r} is not a valid regex ({e}); fix the pattern"
                ) from e
            hit = {n for n in cands if rx.search(n)}
        if not hit:
            raise UserFacingError(f"layer selection {token!r} matches no module; {_describe(cands)}")
        chosen |= hit
    return {n: m for n, m in cands.items() if n in chosen}
