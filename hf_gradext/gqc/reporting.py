"""``GQCOptimizer.statistics()`` in torch-gqc's key vocabulary (plus hf_gradext's own counters).

torch-gqc's wrappers report three kinds of numbers: *vital* counters (``num_batches``, ``num_steps``,
``last_num_draws``, ``last_grad_norm``; mht's ``running_mean``), *optional* window state (``num_draws``,
``history``, ``update_beta``, ``physical_batch_size``) and every numeric hyperparameter the param
groups share (``lr``, ``weight_decay``, ..., and the scheduled value under its torch-gqc name, e.g.
``gradient_norm_threshold``). A value that differs between param groups, or a history list, is reported
as its mean under the key with a ``*`` suffix, as torch-gqc does. ``vital_statistics()`` drops the optional
ones. hf_gradext's own run totals (``total_*``) and last-decision numbers ride along in the verbose form.
"""

from __future__ import annotations

from numbers import Number
from typing import Any

import torch

from hf_gradext.gqc.controllers import GNS, MHT, Controller, GNSSample


def _scalar(value: Any) -> float | int | bool | None:
    if isinstance(value, torch.Tensor):
        return value.item() if value.ndim == 0 else None
    return value if isinstance(value, Number) else None


def _put(out: dict[str, Any], key: str, values: list[Any], aggregate: str) -> None:
    """``key: v`` when all values agree, else ``key*: aggregate(values)`` (torch-gqc's convention)."""
    nums = [_scalar(v) for v in values]
    if not nums or any(v is None for v in nums):
        return
    if all(v == nums[0] for v in nums):
        out[key] = nums[0]
        return
    floats = [float(v) for v in nums]
    agg = {"mean": sum(floats) / len(floats), "max": max(floats), "min": min(floats)}
    if aggregate not in agg:
        raise ValueError(f"aggregate_behavior must be 'mean', 'max' or 'min', got {aggregate!r}")
    out[key + "*"] = agg[aggregate]


def hyperparameters(param_groups: list[dict[str, Any]], aggregate: str = "mean") -> dict[str, Any]:
    """Numeric entries every param group has (``params`` and non-scalars skipped)."""
    out: dict[str, Any] = {}
    if not param_groups:
        return out
    for key in param_groups[0]:
        if key != "params" and all(key in g for g in param_groups):
            _put(out, key, [g[key] for g in param_groups], aggregate)
    return out


def controller_statistics(controller: Controller, vital: bool, aggregate: str = "mean") -> dict[str, Any]:
    """The controller's own torch-gqc keys (its scheduled value is added by the caller)."""
    out: dict[str, Any] = {}
    if isinstance(controller, MHT):
        if controller.running_mean is not None:
            out["running_mean"] = controller.running_mean
        out["confidence_level"] = controller.confidence
        if not vital:
            out["update_beta"] = controller.beta
            _put(out, "history", list(controller.history), aggregate)
    elif isinstance(controller, GNS) and not vital:
        _put(out, "history", list(controller.history), aggregate)
    elif isinstance(controller, GNSSample) and controller.last is not None:
        # New keys (torch-gqc has no per-sample noise scale): the estimate behind the last decision.
        out.update(
            b_simple=controller.last.b_simple,
            trace_sigma=controller.last.trace_sigma,
            signal_sq=controller.last.signal_sq,
        )
    return out
