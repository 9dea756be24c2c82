"""Count host-device synchronisation points in a block of torch code, on any device.

A "sync" here is a Python-level read of a tensor's value (``bool(t)``, ``t.item()``, ``t.tolist()``,
``int(t)``, ``float(t)``, ``torch.equal``): on an accelerator each one blocks the host until the device
has caught up. Counting them through a ``TorchFunctionMode`` works on CPU too, so tests and CPU
benchmarks can show which syncs a patch removes; on CUDA the same count is what
``torch.cuda.set_sync_debug_mode("warn")`` would report for these calls.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from torch.overrides import TorchFunctionMode

_SYNC_FUNCTIONS = frozenset({"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "equal"})


class HostSyncCounter(TorchFunctionMode):
    """Context manager counting value reads of tensors (see module doc). Not for timing: the mode
    itself adds Python overhead to every torch call.

    Example:
        >>> with HostSyncCounter() as counter:
        ...     model(input_ids)
        >>> counter.count
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_name: Counter[str] = Counter()

    @property
    def count(self) -> int:
        """Total number of value reads seen so far."""
        return sum(self.by_name.values())

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in _SYNC_FUNCTIONS:
            self.by_name[name] += 1
        return func(*args, **(kwargs or {}))
