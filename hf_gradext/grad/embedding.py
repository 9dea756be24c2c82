"""``nn.Embedding``: per-sample gradients are the rows a sample looked up (kept sparse).

Here ``a`` is the ``(B, T)`` index tensor the layer received, ``g`` the ``(B, T, d)`` gradient w.r.t.
the looked-up rows. ``G_i = sum_t onehot(a_it) g_it^T``; rows equal to ``padding_idx`` get no gradient
(as in torch).
"""

from __future__ import annotations

from torch import Tensor, nn

from hf_gradext.errors import UserFacingError
from hf_gradext.grad.factors import Contribution, Outer
from hf_gradext.grad.registry import Trainable, register_layer_math, requires_grad


@register_layer_math(nn.Embedding, family="embedding")
def embedding_math(
    module: nn.Module, a: Tensor, g: Tensor, trainable: Trainable = requires_grad
) -> dict[str, Contribution]:
    """Per-sample contribution of an ``nn.Embedding`` weight ``[V, d]`` (index factor, sparse)."""
    if not trainable(module.weight):
        return {}
    if getattr(module, "scale_grad_by_freq", False):
        raise UserFacingError(
            "per-sample gradients: nn.Embedding(scale_grad_by_freq=True) scales by batch-level counts, "
            "so per-sample gradients are not defined; exclude this layer from --per-sample-layers"
        )
    padding_idx = getattr(module, "padding_idx", None)
    if padding_idx is not None:
        g = g * (a != padding_idx).unsqueeze(-1).to(g.dtype)  # torch gives the padding row no grad
    return {"weight": Outer(u=a, v=g, m=module.weight.shape[0])}
