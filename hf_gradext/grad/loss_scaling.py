"""Per-sample rescaling of captured output gradients.

Loss convention: the per-sample gradient of sample ``i`` is the gradient of *its own* mean token loss
``L_i = S_i / n_i``, where ``S_i`` is the sum of its token losses over the ``n_i`` targets with
``labels != -100`` (after the causal shift for causal LMs). Whatever loss is actually backwarded is a
multiple of the token sum, ``loss = c * sum_i S_i`` (HF: ``c = 1 / num_items_in_batch``, times
``num_processes // tp_size`` with ``average_tokens_across_devices``), so sample ``i``'s rows of every captured output
gradient are multiplied by ``1 / (c * n_i)`` to become gradients of ``sum_i L_i``
(:func:`hf_gradext.integrations.loss.hf_loss_multiplier` is the one mirror of HF's ``c``). Samples with
``n_i = 0`` get scale 0; tokens with ``attention_mask == 0`` (padding) are zeroed exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

# Whether the model's loss shifts labels: the package's one answer, defined with HF's other loss
# conventions in hf_gradext.integrations.loss (re-exported here for the engine's callers).
from hf_gradext.integrations.loss import shifts_labels

IGNORE_INDEX = -100


def valid_token_counts(labels: Tensor, shift: bool = True, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``(B,)`` number of loss targets per sample (``labels[:, 1:]`` when the loss shifts labels)."""
    lab = labels[:, 1:] if shift else labels
    return lab.ne(ignore_index).reshape(lab.shape[0], -1).sum(1)


@dataclass
class LossScale:
    """How to turn captured gradients of the backwarded loss into gradients of ``sum_i L_i``.

    Attributes:
        sample_scale: ``(B,)`` factor for sample ``i``'s rows of every output gradient.
        token_mask: ``(B, T)`` 1 for real tokens, 0 for padding (zeroes padding rows exactly), or None.
    """

    sample_scale: Tensor
    token_mask: Tensor | None = None
    _cache: dict[Any, Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return int(self.sample_scale.shape[0])

    @classmethod
    def identity(cls, batch_size: int, attention_mask: Tensor | None = None) -> LossScale:
        """The backwarded loss already is ``sum_i L_i``: only padding is zeroed."""
        return cls(torch.ones(batch_size, dtype=torch.float64), attention_mask)

    @classmethod
    def from_token_sum(
        cls, counts: Tensor, multiplier: float | Tensor, attention_mask: Tensor | None = None
    ) -> LossScale:
        """``loss = multiplier * sum_i S_i`` with ``counts[i] = n_i``: scale ``1 / (multiplier n_i)``.

        Computed on ``counts``' device and never read back to the host: on a GPU, arming a capture
        costs no synchronization (the CPU keeps queueing work ahead of the GPU).
        """
        dtype = _exact_dtype(counts.device)
        n = counts.detach().to(dtype)  # (B,)
        mult = multiplier.detach().to(n.device, dtype) if isinstance(multiplier, Tensor) else multiplier
        scale = torch.where(n > 0, 1.0 / (mult * n.clamp_min(1)), torch.zeros_like(n))
        return cls(scale, attention_mask)

    @classmethod
    def batch_mean(cls, batch: Mapping[str, Any], shift: bool = True) -> LossScale:
        """The backwarded loss is the token mean over this batch (HF's default ``model(**batch).loss``)."""
        counts = valid_token_counts(batch["labels"], shift=shift)
        total = counts.sum().clamp_min(1)  # a device scalar: no host sync
        return cls.from_token_sum(counts, reciprocal(total), batch.get("attention_mask"))

    @classmethod
    def hf_window(
        cls,
        batch: Mapping[str, Any],
        num_items_in_batch: Tensor | int | float,
        *,
        loss_multiplier: float = 1.0,
        shift: bool = True,
    ) -> LossScale:
        """HF Trainer loss ``S_microbatch / num_items_in_batch * loss_multiplier``.

        ``loss_multiplier`` carries the world size (``average_tokens_across_devices``), gradient
        accumulation divisors and an AMP grad-scaler scale (see :mod:`hf_gradext.grad.observer`).
        """
        counts = valid_token_counts(batch["labels"], shift=shift)
        mult = reciprocal(num_items_in_batch) * loss_multiplier
        return cls.from_token_sum(counts, mult, batch.get("attention_mask"))

    def row_scale(self, batch: int, seq: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``(B, T, 1)`` (or ``(B, 1, 1)``) multiplier for an output gradient ``(B, T, d)``."""
        key = (seq, device, dtype)
        if key not in self._cache:
            if batch != self.batch_size:
                raise ValueError(f"captured gradient has batch {batch}, loss scale expects {self.batch_size}")
            exact = _exact_dtype(device)
            s = self.sample_scale.to(device=device, dtype=exact).view(-1, 1)  # (B, 1)
            if self.token_mask is not None and self.token_mask.shape[-1] == seq:
                s = s * self.token_mask.to(device=device, dtype=exact)  # (B, T)
            self._cache[key] = s.to(dtype).unsqueeze(-1)
        return self._cache[key]


def reciprocal(x: Tensor | float) -> Tensor | float:
    """``1 / x`` in float64 (a device scalar stays on its device: no host sync); plain numbers as floats."""
    if isinstance(x, Tensor):
        return 1.0 / x.detach().to(_exact_dtype(x.device))
    return 1.0 / float(x)


def _exact_dtype(device: torch.device) -> torch.dtype:
    """float64 for the scale arithmetic, except on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def resolve_scale(info: LossScale | Mapping[str, Any] | None, model: nn.Module) -> LossScale | None:
    """``LossScale`` as given; a batch dict -> :meth:`LossScale.batch_mean`; ``None`` -> no rescaling."""
    if info is None or isinstance(info, LossScale):
        return info
    if isinstance(info, Mapping):
        if "labels" not in info:
            raise ValueError("capture(batch): the batch has no 'labels'; pass a LossScale instead")
        return LossScale.batch_mean(info, shift=shifts_labels(model))
    raise TypeError(f"capture() takes a LossScale, a batch dict or None, not {type(info).__name__}")
