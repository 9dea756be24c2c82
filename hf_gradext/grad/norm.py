"""LayerNorm and RMSNorm weight/bias: ``grad_w_i = sum_t g_it * xhat_it``, ``grad_b_i = sum_t g_it``.

``a`` and ``g`` are ``(B, *token_dims, *normalized_shape)`` with any number of token dims, including none:
a ``(B, d)`` input normalized over ``d`` has nothing to sum over, and each sample's gradient is its own
``g_i * xhat_i`` (``Tensor.sum(())`` would instead sum *every* dim, batch included, to a 0-dim scalar).

``xhat`` (the normalized input) is recomputed from the captured input ``a`` in at least float32, as the
layers themselves do. Per-sample gradients are only ``prod(normalized_shape)`` numbers, so they are always
materialized (:class:`~hf_gradext.grad.factors.Dense`), and an empty batch gives ``(0, *shape)`` results.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hf_gradext.grad.factors import Contribution, Dense
from hf_gradext.grad.registry import Trainable, register_layer_math, requires_grad


def _token_dims(module: nn.Module, a: Tensor, norm_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The dims between the batch dim and the normalized dims (possibly none)."""
    k = len(norm_shape)
    if a.dim() < k + 1 or tuple(a.shape[a.dim() - k :]) != norm_shape:
        raise ValueError(
            f"{type(module).__name__}: captured input of shape {tuple(a.shape)} is not "
            f"(batch, ..., {', '.join(map(str, norm_shape))}); per-sample gradients need a leading batch dim"
        )
    return tuple(range(1, a.dim() - k))


def _sum_tokens(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    # (B, *token_dims, *shape) -> (B, *shape); no token dims: already one row per sample.
    return x.sum(dims) if dims else x


def _affine(
    module: nn.Module, xhat: Tensor, g: Tensor, dims: tuple[int, ...], trainable: Trainable
) -> dict[str, Contribution]:
    out: dict[str, Contribution] = {}
    w = getattr(module, "weight", None)
    b = getattr(module, "bias", None)
    g = g.to(xhat.dtype)
    if isinstance(w, nn.Parameter) and trainable(w):
        out["weight"] = Dense(_sum_tokens(g * xhat, dims))  # (B, *normalized_shape)
    if isinstance(b, nn.Parameter) and trainable(b):
        out["bias"] = Dense(_sum_tokens(g, dims))  # (B, *normalized_shape)
    return out


def _compute_dtype(a: Tensor) -> torch.dtype:
    return torch.promote_types(a.dtype, torch.float32)


def _norm_shape(module: nn.Module, a: Tensor) -> tuple[int, ...]:
    shape = getattr(module, "normalized_shape", None)
    if shape is not None:
        return tuple(shape)
    w = getattr(module, "weight", None)  # HF *RMSNorm: a (d,) weight over the last dim
    return tuple(w.shape) if isinstance(w, Tensor) else tuple(a.shape[-1:])


@register_layer_math(nn.LayerNorm, family="norm")
def layer_norm_math(
    module: nn.Module, a: Tensor, g: Tensor, trainable: Trainable = requires_grad
) -> dict[str, Contribution]:
    """``nn.LayerNorm`` (any ``normalized_shape``, ``bias`` on/off); ``a``/``g`` ``(B, ..., *normalized_shape)``."""
    shape = tuple(module.normalized_shape)
    dims = _token_dims(module, a, shape)
    norm_dims = tuple(range(-len(shape), 0))
    x = a.to(_compute_dtype(a))
    # Two-pass mean / biased variance, as the layer computes them (torch.var_mean warns on an empty batch).
    xc = x - x.mean(norm_dims, keepdim=True)  # (B, ..., *shape)
    var = xc.pow(2).mean(norm_dims, keepdim=True)  # (B, ..., 1, ..., 1)
    xhat = xc * torch.rsqrt(var + module.eps)  # (B, ..., *shape)
    return _affine(module, xhat, g, dims, trainable)


@register_layer_math(nn.RMSNorm, "*RMSNorm", "T5LayerNorm", family="norm")
def rms_norm_math(
    module: nn.Module, a: Tensor, g: Tensor, trainable: Trainable = requires_grad
) -> dict[str, Contribution]:
    """``nn.RMSNorm`` and HF ``*RMSNorm`` classes (``weight * x / rms(x)``; Gemma's ``1 + weight`` too).

    Works for any class whose ``weight`` multiplies ``x * rsqrt(mean(x^2) + eps)`` over the last dim(s):
    ``normalized_shape`` when the module has one, else the weight's shape.
    """
    shape = _norm_shape(module, a)
    dims = _token_dims(module, a, shape)
    norm_dims = tuple(range(-len(shape), 0))
    eps = getattr(module, "eps", None)
    if eps is None:
        eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        # nn.RMSNorm(eps=None) uses the machine epsilon of the dtype it ran in; ``a`` may have been upcast
        # for the math since, so ask the weight (the layer's own dtype) first.
        w = getattr(module, "weight", None)
        eps = torch.finfo(w.dtype if isinstance(w, Tensor) and w.is_floating_point() else a.dtype).eps
    x = a.to(_compute_dtype(a))
    xhat = x * torch.rsqrt(x.pow(2).mean(norm_dims, keepdim=True) + eps)  # (B, ..., *shape)
    return _affine(module, xhat, g, dims, trainable)
