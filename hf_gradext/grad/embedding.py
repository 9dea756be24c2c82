"""``nn.Embedding``: per-sample gradients are the rows a sample looked up (kept sparse).

Here ``a`` is the ``(B, T)`` index tensor the layer received, ``g`` the ``(B, T, d)`` gradient w.r.t.
the looked-up rows. ``G_i = sum_t onehot(a_it) g_it^T``; rows equal to ``padding_idx`` get no gradient
(as in torch).
"""

from __future__ import annotations

from torch import Tensor, nn

from hf_gradext.errors import UserFacingError
from hf_gradext.grad.factors import Contribution, Outer, as_token_ids, as_tokens
from hf_gradext.grad.registry import Trainable, register_layer_math, requires_grad


@register_layer_math(nn.Embedding, family="embedding")
def embedding_math(
    module: nn.Module, a: Tensor, g: Tensor, trainable: Trainable = requires_grad
) -> dict[str, Contribution]:
    """Per-sample contribution of an ``nn.Embedding`` weight ``[V, d]`` (index factor, sparse).

    Args:
        module: the table.
        a: ``(B, ...)`` looked-up ids (flattened to ``(B, T)``; ``(B,)`` ids are ``T = 1``).
        g: ``(B, ..., d)`` gradient w.r.t. the looked-up rows.
        trainable: which parameters to report (see :mod:`hf_gradext.grad.registry`).
    """
    if not trainable(module.weight):
        return {}
    if getattr(module, "scale_grad_by_freq", False):
        raise UserFacingError(
            "per-sample gradients: nn.Embedding(scale_grad_by_freq=True) scales by batch-level counts, "
            "so per-sample gradients are not defined; exclude this layer from --per-sample-layers"
        )
    a, g = as_token_ids(a), as_tokens(g)  # (B, T), (B, T, d)
    padding_idx = getattr(module, "padding_idx", None)
    if padding_idx is not None:
        # torch gives the padding row no gradient, even where padding_idx is also a real token id.
        g = g * (a != padding_idx).unsqueeze(-1).to(g.dtype)  # (B, T, d)
    return {"weight": Outer(u=a, v=g, m=module.weight.shape[0])}
