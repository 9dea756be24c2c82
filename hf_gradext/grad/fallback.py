"""``torch.func`` fallback for trainable module types without registered math.

For a module whose forward takes one tensor and returns one tensor and treats samples independently,
the per-sample gradient of its directly-owned parameters is a vmapped VJP of the module's forward on that
sample's captured input with that sample's output gradient. Exact, but slower than the registered math
and always materialized. Batch-coupled layers (BatchNorm) have no per-sample gradients and are refused.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from hf_gradext.errors import UserFacingError
from hf_gradext.grad.factors import Contribution, Dense
from hf_gradext.grad.registry import LayerSpec, Trainable, requires_grad


def check_fallback_ok(name: str, module: nn.Module) -> None:
    """Raise for module types where per-sample gradients are undefined."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise UserFacingError(
            f"{name} ({type(module).__name__}) mixes samples through batch statistics, so per-sample gradients "
            "are undefined; exclude it from the layer selection or use GroupNorm/LayerNorm"
        )


def fallback_math(
    module: nn.Module, a: Tensor, g: Tensor, trainable: Trainable = requires_grad
) -> dict[str, Contribution]:
    """Per-sample gradients of ``module``'s own trainable parameters via ``vmap(vjp(...))``.

    Args:
        module: a module whose ``forward(x)`` maps one tensor to one tensor, sample-wise.
        a: ``(B, ...)`` captured input.
        g: ``(B, ...)`` gradient w.r.t. the output.
        trainable: which parameters to report (see :mod:`hf_gradext.grad.registry`).
    """
    own = {k: p.detach() for k, p in module.named_parameters(recurse=False) if trainable(p)}
    if not own:
        return {}
    if a.shape[0] == 0:  # vmap cannot map over an empty batch; the answer is known: no samples
        return {
            k: Dense(p.new_zeros((0, *p.shape), dtype=torch.promote_types(p.dtype, g.dtype)))
            for k, p in own.items()
        }

    def one_sample(x: Tensor, gi: Tensor) -> dict[str, Tensor]:
        def f(params: dict[str, Tensor]) -> Tensor:
            return functional_call(module, params, (x.unsqueeze(0),), strict=False)

        _, pullback = vjp(f, own)
        return pullback(gi.unsqueeze(0).to(a.dtype))[0]

    try:
        grads = vmap(one_sample)(a, g)
    except Exception as e:  # vmap reports data-dependent control flow, randomness, in-place ops ...
        raise UserFacingError(
            f"torch.func fallback failed for {type(module).__name__} ({type(e).__name__}: {str(e)[:120]}); "
            "exclude the layer from the selection or register math for it with register_layer_math"
        ) from e
    return {k: Dense(v.to(torch.promote_types(v.dtype, g.dtype))) for k, v in grads.items()}


FALLBACK_SPEC = LayerSpec(family="fallback", math=fallback_math)
