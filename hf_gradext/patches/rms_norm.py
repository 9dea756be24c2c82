"""RMSNorm for the GPT-2 patch: a plain ``torch.nn.RMSNorm`` (fused ``F.rms_norm``).

Subclassing ``nn.RMSNorm`` (instead of writing a new module) keeps three consumers working unchanged:
HF's ``_init_weights`` (it matches ``"RMSNorm"`` in the class name and sets the weight to ones), the
per-sample gradient engine (an ``nn.RMSNorm`` with ``weight`` and ``eps``) and ``torch.compile``.
"""

from __future__ import annotations

import torch
from torch import nn


class GradExtRMSNorm(nn.RMSNorm):
    """``y = x / sqrt(mean(x^2, -1) + eps) * weight`` over the last dimension, no bias.

    ``forward`` is ``torch.nn.functional.rms_norm``, which torch dispatches to its fused kernel
    (``torch._fused_rms_norm``) where one exists; no third-party kernel is required.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(hidden_size, eps=eps, elementwise_affine=True, device=device, dtype=dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The textbook formula in float64, for tests and benchmarks. ``x``: (..., d), ``weight``: (d,)."""
    x64 = x.double()  # (..., d)
    inv_rms = torch.rsqrt(x64.pow(2).mean(dim=-1, keepdim=True) + eps)  # (..., 1)
    return (x64 * inv_rms * weight.double()).to(x.dtype)
