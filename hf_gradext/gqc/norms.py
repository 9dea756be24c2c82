"""Gradient norms for GQC decisions (pure torch)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def grads_of(params: Iterable[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The existing ``.grad`` tensors of ``params`` (frozen / unused parameters have none)."""
    return [p.grad for p in params if p.grad is not None]


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all ``grads`` as a 0-dim float32 tensor (foreach kernels; no host sync)."""
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=None).float()


def scale_(grads: list[torch.Tensor], factor: float) -> None:
    """``g *= factor`` for every gradient, in place."""
    if grads and factor != 1.0:
        torch._foreach_mul_(grads, factor)


class MicrobatchNormTracker:
    """Norm of each backward's *own* gradient, before it is added into ``.grad``.

    Accumulated ``.grad`` only shows the running sum; the gns controller needs every microbatch's
    gradient norm. A tensor hook on each parameter sees the incoming gradient (once per backward,
    tied weights included) and adds its squared norm to an on-device accumulator.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter]) -> None:
        self._sq: torch.Tensor | None = None
        self._handles = [p.register_hook(self._hook) for p in params if p.requires_grad]

    def _hook(self, grad: torch.Tensor) -> None:
        sq = grad.detach().float().pow(2).sum()
        self._sq = sq if self._sq is None else self._sq + sq.to(self._sq.device)

    def pop(self) -> float:
        """Norm of the gradient seen since the last ``pop`` (0.0 if none); resets."""
        return float(self.pop_tensor())

    def pop_tensor(self) -> torch.Tensor | float:
        """:meth:`pop` left on the device (no host read: the GQC loop sends it with its one reduction)."""
        value = 0.0 if self._sq is None else self._sq.sqrt()
        self._sq = None
        return value

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
