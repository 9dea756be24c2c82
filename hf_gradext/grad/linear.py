"""``nn.Linear`` (weight ``[out, in]``): ``G_i = sum_t g_it a_it^T``, bias ``sum_t g_it``.

The bias contribution is a token sum (``Outer(v=None)``): exact, and never routed through the ghost Gram.
"""

from __future__ import annotations

from torch import Tensor, nn

from hf_gradext.grad.factors import Contribution, Outer, as_tokens
from hf_gradext.grad.registry import Trainable, register_layer_math, requires_grad


@register_layer_math(nn.Linear, family="linear", autocast_input=True)
def linear_math(
    module: nn.Module, a: Tensor, g: Tensor, trainable: Trainable = requires_grad
) -> dict[str, Contribution]:
    """Per-sample contributions of an ``nn.Linear``.

    Args:
        module: the layer (only its trainable parameters are reported).
        a: ``(B, ..., d_in)`` layer input (any number of token dims, flattened to ``(B, T, d_in)``).
        g: ``(B, ..., d_out)`` gradient w.r.t. the layer output.
        trainable: which parameters to report (see :mod:`hf_gradext.grad.registry`).
    """
    a, g = as_tokens(a), as_tokens(g)  # (B, T, d_in), (B, T, d_out); a (B, d) input is T = 1
    out: dict[str, Contribution] = {}
    if trainable(module.weight):
        out["weight"] = Outer(u=g, v=a, m=g.shape[-1])  # [out, in] = sum_t g (x) a
    if module.bias is not None and trainable(module.bias):
        out["bias"] = Outer(u=g, v=None, m=g.shape[-1])
    return out
