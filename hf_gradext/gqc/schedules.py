"""Threshold schedules for GQC controllers, measured in microbatches of data consumed.

A schedule maps ``t`` (microbatches consumed before the current one) to the controller's value:

* warmup (``t < warmup``): linear from ``start * warmup_multiplier`` to ``start`` (an *inverse* warmup
  for multipliers > 1, which start permissive; multiplier 0 is an ordinary warmup from 0);
* after warmup, ``kind`` from ``start`` to ``end`` over ``horizon - warmup`` microbatches, then ``end``,
  with ``p`` the fraction of that span:

  ==================  ==========================================  ==============================
  ``constant``        ``start``
  ``linear``          ``end + (start - end) (1 - p)``
  ``half_cosine``     ``end + (start - end) (1 + cos(pi p)) / 2``   HF / PyTorch cosine annealing
  ``cosine``          same as ``half_cosine`` (the CLI's historical meaning)
  ``quarter_cosine``  ``end + (start - end) cos(pi p / 2)``         torch-gqc (torch-schedule-anything)
  ``polynomial``      ``end + (start - end) (1 - p)^power``
  ==================  ==========================================  ==============================

  The quarter cosine stays near ``start`` longer: at mid-span it has covered 29% of the way to ``end``,
  the half cosine 50% (the two differ by up to 21% of ``start - end``, at ``p = 0.5``).

The functions named like torch-schedule-anything's builtins (``cosine_annealing_with_inverse_warmup``,
...), which torch-gqc's factories use for their thresholds, build the same curves: torch-gqc stores the
threshold in the optimizer's param groups at 1.0 and schedules a multiplier of it, so its threshold at
``schedule.step()`` count ``t`` equals ``value(t)`` here when the schedule is stepped once per
microbatch, as in torch-gqc's quickstart. Past ``num_training_steps`` torch-schedule-anything keeps
evaluating its formula (the quarter cosine then drops below ``anneal_to_value``, eventually below 0);
these schedules hold the end value.

Measuring in data (not optimizer steps) keeps a GQC run and a fixed-accumulation run over the same
data on the same schedule, whatever number of steps the controller ends up taking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULE_KINDS = ("constant", "cosine", "half_cosine", "quarter_cosine", "linear", "polynomial")


@dataclass(frozen=True)
class ThresholdSchedule:
    """Value of a controller's threshold as a function of data consumed.

    Args:
        start: value right after warmup.
        end: value at ``horizon``.
        horizon: total microbatches of the run (the data budget).
        kind: one of ``SCHEDULE_KINDS`` (module docstring).
        warmup: microbatches of warmup.
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
        span = self.horizon - self.warmup
        p = 1.0 if span <= 0 else min(1.0, max(0.0, (t - self.warmup) / span))  # no span: at the end
        if self.kind == "linear":
            return self.end + (self.start - self.end) * (1.0 - p)
        if self.kind in ("cosine", "half_cosine"):
            return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * p))
        if self.kind == "quarter_cosine":
            return self.end + (self.start - self.end) * math.cos(0.5 * math.pi * p)
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


# ---- torch-schedule-anything's builtins (torch-gqc's threshold schedules), same names and arguments.
# ``num_training_steps`` / ``num_warmup_steps`` count microbatches (schedule.step() calls in torch-gqc's loop).


def _tsa(
    kind: str,
    warmup_to_value: float,
    anneal_to_value: float,
    num_warmup_steps: int,
    num_training_steps: int,
    warmup_multiplier: float,
    power: float = 2.0,
) -> ThresholdSchedule:
    return ThresholdSchedule(
        start=warmup_to_value,
        end=anneal_to_value,
        horizon=max(1, num_training_steps),
        kind=kind,
        warmup=num_warmup_steps,
        warmup_multiplier=warmup_multiplier,
        power=power,
    )


def cosine_annealing_with_warmup(
    warmup_to_value: float, anneal_to_value: float, num_warmup_steps: int, num_training_steps: int
) -> ThresholdSchedule:
    """Warmup from 0, then the quarter cosine to ``anneal_to_value``."""
    return _tsa("quarter_cosine", warmup_to_value, anneal_to_value, num_warmup_steps, num_training_steps, 0.0)


def cosine_annealing_with_inverse_warmup(
    warmup_to_value: float,
    anneal_to_value: float,
    num_warmup_steps: int,
    num_training_steps: int,
    warmup_multiplier: float = 20.0,
) -> ThresholdSchedule:
    """Inverse warmup from ``warmup_to_value * warmup_multiplier``, then the quarter cosine."""
    return _tsa(
        "quarter_cosine",
        warmup_to_value,
        anneal_to_value,
        num_warmup_steps,
        num_training_steps,
        warmup_multiplier,
    )


def polynomial_schedule_with_warmup(
    warmup_to_value: float,
    anneal_to_value: float,
    num_warmup_steps: int,
    num_training_steps: int,
    polynomial_exponent: float = 2.0,
) -> ThresholdSchedule:
    """Warmup from 0, then ``anneal + (warmup_to - anneal) (1 - p)^polynomial_exponent``."""
    return _tsa(
        "polynomial",
        warmup_to_value,
        anneal_to_value,
        num_warmup_steps,
        num_training_steps,
        0.0,
        polynomial_exponent,
    )


def polynomial_schedule_with_inverse_warmup(
    warmup_to_value: float,
    anneal_to_value: float,
    num_warmup_steps: int,
    num_training_steps: int,
    polynomial_exponent: float = 2.0,
    warmup_multiplier: float = 20.0,
) -> ThresholdSchedule:
    """Inverse warmup, then the polynomial."""
    return _tsa(
        "polynomial",
        warmup_to_value,
        anneal_to_value,
        num_warmup_steps,
        num_training_steps,
        warmup_multiplier,
        polynomial_exponent,
    )


def linear_schedule_with_warmup(
    warmup_to_value: float, anneal_to_value: float, num_warmup_steps: int, num_training_steps: int
) -> ThresholdSchedule:
    """Warmup from 0, then linear."""
    return _tsa("linear", warmup_to_value, anneal_to_value, num_warmup_steps, num_training_steps, 0.0)


def linear_schedule_with_inverse_warmup(
    warmup_to_value: float,
    anneal_to_value: float,
    num_warmup_steps: int,
    num_training_steps: int,
    warmup_multiplier: float = 20.0,
) -> ThresholdSchedule:
    """Inverse warmup, then linear."""
    return _tsa(
        "linear", warmup_to_value, anneal_to_value, num_warmup_steps, num_training_steps, warmup_multiplier
    )


def constant_with_warmup(warmup_to_value: float, num_warmup_steps: int) -> ThresholdSchedule:
    """Warmup from 0, then constant."""
    return _tsa("constant", warmup_to_value, warmup_to_value, num_warmup_steps, num_warmup_steps + 1, 0.0)


def constant_with_inverse_warmup(
    warmup_to_value: float, num_warmup_steps: int, warmup_multiplier: float = 20.0
) -> ThresholdSchedule:
    """Inverse warmup, then constant."""
    return _tsa(
        "constant",
        warmup_to_value,
        warmup_to_value,
        num_warmup_steps,
        num_warmup_steps + 1,
        warmup_multiplier,
    )
