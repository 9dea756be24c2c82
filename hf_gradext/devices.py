"""Devices: checking a ``--device`` flag before any work, and moving results to the host without
making the CPU wait for the GPU."""

from __future__ import annotations

import torch

from hf_gradext.errors import UserFacingError


def check_device(value: str, flag: str = "--device", allow_auto: bool = False) -> None:
    """Raise a one-line :class:`UserFacingError` unless ``value`` names a usable device.

    Args:
        value: ``cpu``, ``cuda``, ``cuda:N``, ... (and ``auto`` when ``allow_auto``).
        flag: the flag name for the message.
        allow_auto: accept ``auto`` (resolved later, e.g. to the accelerate device of the process).
    """
    if allow_auto and value == "auto":
        return
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise UserFacingError(f"{flag}={value!r} is not a device; pass cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserFacingError(
                f"{flag}={value} but this machine has no usable CUDA device; pass {flag} cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserFacingError(
                f"{flag}={value} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                "pass an index below that"
            )
    elif device.type not in ("cpu", "meta") and not getattr(torch, device.type).is_available():
        raise UserFacingError(f"{flag}={value} is not available on this machine; pass {flag} cpu")


class HostCopy:
    """Device tensors on their way to host memory, readable once :meth:`wait` returns.

    The copies go into pinned memory with ``non_blocking=True``, so starting them does not make the CPU
    wait for the GPU; :meth:`wait` blocks only until the work queued before the copies is done. Code
    that waits one step later (write batch ``k`` while batch ``k + 1`` runs) never stalls the GPU.
    CPU tensors are plain copies and ``wait`` returns at once.
    """

    def __init__(self, *tensors: torch.Tensor | None) -> None:
        self.tensors = tuple(_start_copy(t) if isinstance(t, torch.Tensor) else t for t in tensors)
        self._ready = None
        cuda = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda]
        if cuda:
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(cuda[0].device))  # the stream the copies went on

    def wait(self) -> tuple[torch.Tensor | None, ...]:
        """The host tensors, after their copies have finished."""
        if self._ready is not None:
            self._ready.synchronize()
            self._ready = None
        return self.tensors


def _start_copy(t: torch.Tensor) -> torch.Tensor:
    if not t.is_cuda:
        return t.detach().to("cpu", copy=True)  # a snapshot, like the GPU path
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t.detach(), non_blocking=True)
    return host
