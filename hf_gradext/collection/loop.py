"""Reference per-sample gradients: one forward/backward per sample (slow; tests and benchmarks only).

Each sample's gradient is that of its own mean token loss over ``labels != -100`` -- exactly what HF's
causal-LM loss computes for a batch of one -- so it matches the engine's convention.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from hf_gradext.integrations.loss import shifts_labels

# Batch keys that are bookkeeping, not model inputs.
NON_MODEL_KEYS = ("example_id",)


def selected_parameters(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    """``{named_parameters name: param}`` of the trainable parameters the selected modules own directly.

    A parameter shared by several modules (tied embeddings) appears once, under its canonical name.
    """
    wanted = {id(p) for m in modules.values() for p in m.parameters(recurse=False) if p.requires_grad}
    return {n: p for n, p in model.named_parameters() if id(p) in wanted}


def slice_batch(batch: dict[str, Any], sl: slice, batch_size: int) -> dict[str, Any]:
    """Rows ``sl`` of every batch tensor whose leading dim is the batch."""
    out = {}
    for key, value in batch.items():
        if key in NON_MODEL_KEYS:
            continue
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch_size:
            out[key] = value[sl]
        else:
            out[key] = value
    return out


def loop_per_sample_gradients(
    model: nn.Module,
    batch: dict[str, Any],
    params: dict[str, nn.Parameter],
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """``{name: (B, *param.shape)}`` per-sample gradients by a Python loop over the batch.

    Gradients come from ``torch.autograd.grad``, so ``param.grad`` is never touched. Autocast is off:
    this is the fp32 reference.
    """
    batch_size = batch["input_ids"].shape[0]
    names = list(params)
    out = {
        n: torch.zeros((batch_size, *params[n].shape), dtype=dtype, device=params[n].device) for n in names
    }
    device_type = params[names[0]].device.type if names else "cpu"
    shift = shifts_labels(model)  # which label positions the model's own loss counts
    with torch.autocast(device_type=device_type, enabled=False):
        for i in range(batch_size):
            sample = slice_batch(batch, slice(i, i + 1), batch_size)
            labels = sample.get("labels")
            targets = labels[:, 1:] if shift and labels is not None else labels
            if labels is not None and not bool((targets != -100).any()):
                continue  # no supervised token: zero gradient (HF would return NaN)
            loss = model(**sample).loss
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    out[n][i] = g.to(dtype)
    return out
