"""Threshold schedules for GQC controllers, measured in microbatches of data consumed.

A schedule maps ``t`` (microbatches consumed before the current one) to the controller's value:

* inverse warmup (``t < warmup``): linear from ``start * warmup_multiplier`` to ``start``;
* after warmup: ``constant`` (start), ``linear``, ``cosine`` or ``polynomial`` from ``start`` to
  ``end`` over ``horizon - warmup`` microbatches, then ``end``.

Measuring in data (not optimizer steps) keeps a GQC run and a fixed-accumulation run over the same
data on the same schedule, whatever number of steps the controller ends up taking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULE_KINDS = ("constant", "cosine", "linear", "polynomial")


@dataclass(frozen=True)
class ThresholdSchedule:
    """Value of a controller's threshold as a function of data consumed.

    Args:
        start: value right after warmup.
        end: value at ``horizon``.
        horizon: total microbatches of the run (the data budget).
        kind: one of ``SCHEDULE_KINDS``.
        warmup: microbatches of inverse warmup.
        warmup_multiplier: the warmup starts at ``start * warmup_multiplier``.
        power: exponent of the ``polynomial`` kind.
    """

    start: float
    end: float
    horizon: int
    kind: str = "constant"
    warmup: int = 0
    warmup_multiplier: float = 1.0
    power: float = 2.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown schedule kind {self.kind!r}; choose one of {SCHEDULE_KINDS}")
        if self.horizon < 1 or self.warmup < 0:
            raise ValueError("horizon must be >= 1 and warmup >= 0")

    def __call__(self, t: float) -> float:
        if t < self.warmup:
            frac = t / self.warmup
            return self.start * (self.warmup_multiplier + (1.0 - self.warmup_multiplier) * frac)
        if self.kind == "constant":
            return self.start
        span = max(1, self.horizon - self.warmup)
        p = min(1.0, max(0.0, (t - self.warmup) / span))
        if self.kind == "linear":
            return self.start + (self.end - self.start) * p
        if self.kind == "cosine":
            return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * p))
        return self.end + (self.start - self.end) * (1.0 - p) ** self.power


def schedule_from_args(args, horizon: int) -> ThresholdSchedule:
    """Build the threshold schedule of a run from ``GQCArguments`` fields and its data horizon."""
    warmup = (
        args.gqc_warmup_steps if args.gqc_warmup_steps > 0 else math.ceil(args.gqc_warmup_ratio * horizon)
    )
    end = args.gqc_threshold_start if args.gqc_threshold_end is None else args.gqc_threshold_end
    return ThresholdSchedule(
        start=args.gqc_threshold_start,
        end=end,
        horizon=max(1, horizon),
        kind=args.gqc_schedule,
        warmup=warmup,
        warmup_multiplier=args.gqc_warmup_multiplier,
        power=args.gqc_schedule_power,
    )
