"""Module surgery on an HF ``GPT2Model``: LayerNorm -> RMSNorm, GELU MLP -> SwiGLU.

Only submodules of the ``GPT2Block`` s (and ``ln_f``) are replaced; the blocks themselves stay
``GradientCheckpointingLayer`` s, so activation checkpointing keeps recomputing whole blocks.
"""

from __future__ import annotations

import re
from collections import Counter

from torch import nn
from transformers.models.gpt2.modeling_gpt2 import GPT2Model

from hf_gradext.patches.rms_norm import GradExtRMSNorm
from hf_gradext.patches.swiglu import GradExtSwiGLUMLP

_NORM_NAMES = ("ln_1", "ln_2", "ln_cross_attn")


def _rms_from_layer_norm(ln: nn.LayerNorm) -> GradExtRMSNorm:
    """RMSNorm with the LayerNorm's eps, device and dtype; its scale reuses the LayerNorm's gamma."""
    weight = ln.weight
    rms = GradExtRMSNorm(ln.normalized_shape[-1], eps=ln.eps, device=weight.device, dtype=weight.dtype)
    if weight.device.type != "meta":
        rms.weight.data.copy_(weight.data)
    return rms


def swap_gpt2_modules(
    model: GPT2Model, rms_norm: bool, swiglu: bool, swiglu_hidden_size: int | None
) -> tuple[list[str], list[str]]:
    """Replace norms / MLPs of ``model`` in place (already-replaced modules are left alone).

    Returns:
        ``(new, dropped)``: parameter names (relative to ``model``) that did not exist before and
        therefore hold fresh initial values, and names that were removed.
    """
    new: list[str] = []
    dropped: list[str] = []

    def replace(parent: nn.Module, attr: str, prefix: str, module: nn.Module, fresh: bool) -> None:
        old = getattr(parent, attr)
        old_names = {f"{prefix}{attr}.{n}" for n, _ in old.named_parameters()}
        new_names = {f"{prefix}{attr}.{n}" for n, _ in module.named_parameters()}
        setattr(parent, attr, module)
        dropped.extend(sorted(old_names - new_names))
        new.extend(sorted(new_names if fresh else new_names - old_names))

    config = model.config
    for i, block in enumerate(model.h):
        prefix = f"h.{i}."
        if rms_norm:
            for attr in _NORM_NAMES:
                ln = getattr(block, attr, None)
                if isinstance(ln, nn.LayerNorm):
                    replace(block, attr, prefix, _rms_from_layer_norm(ln), fresh=False)
        if swiglu and not isinstance(block.mlp, GradExtSwiGLUMLP):
            ref = block.mlp.c_fc.weight
            mlp = GradExtSwiGLUMLP(
                config.hidden_size,
                swiglu_hidden_size,
                dropout=config.resid_pdrop,
                device=ref.device,
                dtype=ref.dtype,
            )
            replace(block, "mlp", prefix, mlp, fresh=True)
    if rms_norm and isinstance(model.ln_f, nn.LayerNorm):
        replace(model, "ln_f", "", _rms_from_layer_norm(model.ln_f), fresh=False)
    return new, dropped


def summarize_names(names: list[str]) -> str:
    """``h.0.mlp.up_proj.weight, h.1.mlp.up_proj.weight`` -> ``h.*.mlp.up_proj.weight (x2)``."""
    counts = Counter(re.sub(r"(^|\.)h\.\d+\.", r"\1h.*.", n) for n in names)
    return ", ".join(f"{name} (x{c})" if c > 1 else name for name, c in sorted(counts.items()))
