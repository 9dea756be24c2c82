"""Split a batch into sample chunks so materialized per-sample gradients stay under a memory budget."""

from __future__ import annotations

from torch import nn

from hf_gradext.errors import UserFacingError

MIB = 1024 * 1024


def chunk_size_for(bytes_per_sample: int, budget_bytes: int, requested: int = 0) -> int:
    """Samples that may be materialized at once.

    Args:
        bytes_per_sample: bytes of one sample's materialized gradient (one layer, or all layers).
        budget_bytes: the extra memory allowed.
        requested: ``--gradient_collection_chunk_size`` (0 = derive from the budget); never exceeds the
            budget either way.

    Raises:
        UserFacingError: when not even one sample fits the budget.
    """
    if bytes_per_sample <= 0:
        return max(requested, 1) if requested else 1 << 30
    fit = budget_bytes // bytes_per_sample
    if fit < 1:
        raise UserFacingError(
            f"one sample's gradient needs {bytes_per_sample / MIB:.1f} MiB but "
            f"--gradient_collection_memory_budget_mb is {budget_bytes / MIB:.1f}; raise the budget or "
            "collect fewer layers (--gradient_collection_layers) or --gradient_collection_save norms"
        )
    return int(min(fit, requested) if requested else fit)


def chunks(n: int, size: int) -> list[slice]:
    """``[0:size], [size:2 size], ...`` covering ``range(n)``."""
    size = max(1, size)
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def dense_param_bytes(module: nn.Module, itemsize: int) -> int:
    """Bytes of one sample's dense gradient of ``module``'s own trainable parameters."""
    return sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad) * itemsize
