"""Peak extra memory of gradient collection.

On CUDA we read ``torch.cuda.memory_allocated`` relative to a baseline taken when collection starts
work on a layer, so the number is what collection itself holds (we do not reset the global peak
counters: other callbacks read them). On CPU there is no allocator counter, so the meter accounts the
bytes of the tensors collection materializes at once; this is a lower bound on the true CPU peak.
"""

from __future__ import annotations

import torch
from torch import Tensor

MIB = 1024 * 1024


class PeakMemoryMeter:
    """Tracks the largest extra memory held by collection within one collected step."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.peak_bytes = 0
        self._base = 0

    @property
    def source(self) -> str:
        return "cuda_allocated" if self.cuda else "accounted"

    def reset(self) -> None:
        self.peak_bytes = 0

    def start(self) -> None:
        """Take the baseline before materializing anything."""
        if self.cuda:
            self._base = torch.cuda.memory_allocated(self.device)

    def observe(self, *held: Tensor) -> None:
        """Record the memory held now; ``held`` are the tensors collection holds (used on CPU)."""
        if self.cuda:
            extra = torch.cuda.memory_allocated(self.device) - self._base
        else:
            extra = sum(t.numel() * t.element_size() for t in held)
        self.peak_bytes = max(self.peak_bytes, int(extra))

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / MIB
