"""Checking a ``--device`` flag before any work: the device must exist on this machine."""

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
