"""LayerNorm and RMSNorm weight/bias: ``grad_w_i = sum_t g_it * xhat_it``, ``grad_b_i = sum_t g_it``.

``xhat`` (the normalized input) is recomputed from the captured input ``a`` in at least float32, as the
layers themselves do. Per-sample gradients are only ``d`` numbers, so they are always materialized.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hf_gradext.grad.factors import Contribution, Dense
from hf_gradext.grad.registry import Trainable, register_layer_math, requires_grad


def _affine(
    module: nn.Module, xhat: Tensor, g: Tensor, red: tuple[int, ...], trainable: Trainable
) -> dict[str, Contribution]:
    # red: the sequence dims to sum over (everything between batch and the normalized dims).
    out: dict[str, Contribution] = {}
    w = getattr(module, "weight", None)
    b = getattr(module, "bias", None)
    g = g.to(xhat.dtype)
    if isinstance(w, nn.Parameter) and trainable(w):
        out["weight"] = Dense((g * xhat).sum(red))  # (B, *normalized_shape)
    if isinstance(b, nn.Parameter) and trainable(b):
        out["bias"] = Dense(g.sum(red))
    return out


def _compute_dtype(a: Tensor) -> torch.dtype:
    return torch.promote_types(a.dtype, torch.float32)


@register_layer_math(nn.LayerNorm, family="norm")
def layer_norm_math(
    module: nn.Module, a: Tensor, g: Tensor, trainable: Trainable = requires_grad
) -> dict[str, Contribution]:
    """``nn.LayerNorm`` (any ``normalized_shape``); ``a``/``g`` are ``(B, T, *normalized_shape)``."""
    k = len(module.normalized_shape)
    dims = tuple(range(-k, 0))
    x = a.to(_compute_dtype(a))
    var, mean = torch.var_mean(x, dim=dims, keepdim=True, correction=0)
    xhat = (x - mean) * torch.rsqrt(var + module.eps)
    return _affine(module, xhat, g, tuple(range(1, a.dim() - k)), trainable)


@register_layer_math(nn.RMSNorm, "*RMSNorm", "T5LayerNorm", family="norm")
def rms_norm_math(
    module: nn.Module, a: Tensor, g: Tensor, trainable: Trainable = requires_grad
) -> dict[str, Contribution]:
    """``nn.RMSNorm`` and HF ``*RMSNorm`` classes (``weight * x / rms(x)``; Gemma's ``1 + weight`` too).

    Works for any class whose ``weight`` multiplies ``x * rsqrt(mean(x^2) + eps)`` over the last dim(s).
    """
    shape = getattr(module, "normalized_shape", None)
    k = len(shape) if shape is not None else 1
    dims = tuple(range(-k, 0))
    eps = getattr(module, "eps", None)
    if eps is None:
        eps = getattr(module, "variance_epsilon", None)
    if eps is None:  # nn.RMSNorm(eps=None) uses the input dtype's machine epsilon
        eps = torch.finfo(a.dtype).eps
    x = a.to(_compute_dtype(a))
    xhat = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    return _affine(module, xhat, g, tuple(range(1, a.dim() - k)), trainable)
