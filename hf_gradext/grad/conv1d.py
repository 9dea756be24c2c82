"""HF GPT-2 ``Conv1D`` (weight stored ``[in, out]``): ``G_i = sum_t a_it g_it^T``, bias ``sum_t g_it``.

Registered by class name so this file never imports transformers.
"""

from __future__ import annotations

from torch import Tensor, nn

from hf_gradext.grad.factors import Contribution, Outer, as_tokens
from hf_gradext.grad.registry import Trainable, register_layer_math, requires_grad


@register_layer_math("Conv1D", family="linear", autocast_input=True)
def conv1d_math(
    module: nn.Module, a: Tensor, g: Tensor, trainable: Trainable = requires_grad
) -> dict[str, Contribution]:
    """Per-sample contributions of an HF ``Conv1D``.

    Args:
        module: the layer; ``module.weight`` is ``[d_in, d_out]``.
        a: ``(B, ..., d_in)`` layer input (any number of token dims, flattened to ``(B, T, d_in)``).
        g: ``(B, ..., d_out)`` gradient w.r.t. the layer output.
        trainable: which parameters to report (see :mod:`hf_gradext.grad.registry`).
    """
    a, g = as_tokens(a), as_tokens(g)  # (B, T, d_in), (B, T, d_out); a (B, d) input is T = 1
    out: dict[str, Contribution] = {}
    if trainable(module.weight):
        out["weight"] = Outer(u=a, v=g, m=a.shape[-1])  # [in, out] = sum_t a (x) g
    if getattr(module, "bias", None) is not None and trainable(module.bias):
        out["bias"] = Outer(u=g, v=None, m=g.shape[-1])
    return out
