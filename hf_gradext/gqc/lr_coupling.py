"""Learning rate coupled to the window size: ``--gqc_lr_coupling`` and the Seesaw rule of ``--gqc seesaw``.

Both act on the LR of *one optimizer step*: the LR scheduler still runs over data (it sits at the data
position where the window started, as for every GQC run); at the step the loop multiplies every param
group's LR by :func:`step_multiplier` for ``optimizer.step()`` only and restores it afterwards (so chained
schedulers never see the multiplied value). Callbacks' ``on_pre_optimizer_step`` / ``on_optimizer_step``
and the logged ``learning_rate`` see the multiplied LR.

``--gqc_lr_coupling sqrt | linear`` (any controller): the step that closes a window of ``k`` microbatches
uses ``lr(start) * (k / k0) ** e`` with ``e = 1/2`` (sqrt, the Adam scaling rule) or ``e = 1`` (linear,
the SGD rule), ``lr(start)`` the scheduler's LR at the window's first microbatch, ``k0`` =
``--gqc_lr_coupling_k0`` or, when that is 0, the size of the run's first window (kept in checkpoints).

Seesaw (Meterez et al., 2025: "whenever a standard scheduler would halve the learning rate, multiply it
by 1/sqrt(2) and double the batch size"), read for a continuous base schedule over data. With
``f(t)`` = the scheduler's LR factor at data position ``t`` (its LR over its initial LR), ``P(t)`` =
``max_{s <= t} f(s)`` (the peak so far: warmup never triggers a growth) and ``j`` growths so far:

* at each window start ``t``: while ``j < J`` and ``f(t) <= P(t) / 2^(j+1)``: ``j += 1``, where
  ``J = floor(log2(cap / k0))`` is the number of doublings the cap allows;
* the window has ``k0 * 2^j`` microbatches (the controller steps at that size);
* its step uses the factor ``P * 2^(-j/2)`` while ``j < J`` (held between growth points: the halving
  of the base schedule is replaced, not followed), and ``f(t) * 2^(J/2)`` once the cap stops the growth
  (the base decay is followed again from the last growth point on, continuously, so the run still anneals).

``J = 0`` (cap = k0) is the base schedule unchanged. The comparison has a relative slack of 1e-9 so a
growth point that the schedule reaches exactly in real arithmetic is not missed by rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

COUPLINGS = ("none", "sqrt", "linear")
_EXPONENTS = {"sqrt": 0.5, "linear": 1.0}
_SLACK = 1e-9


@dataclass
class PowerCoupling:
    """``(k / k0) ** exponent``; ``k0=None``: latched from the first window that steps."""

    exponent: float
    k0: int | None = None

    def multiplier(self, k: int) -> float:
        if self.k0 is None:
            self.k0 = k
        return (k / self.k0) ** self.exponent

    def state_dict(self) -> dict[str, Any]:
        return {"k0": self.k0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.k0 = state.get("k0", self.k0)


def build_coupling(kind: str, k0: int = 0) -> PowerCoupling | None:
    """The ``--gqc_lr_coupling`` object (``None`` for ``none``); ``k0 = 0``: the first window's size."""
    if kind == "none":
        return None
    if kind not in _EXPONENTS:
        raise ValueError(f"unknown LR coupling {kind!r}; choose one of {COUPLINGS}")
    return PowerCoupling(_EXPONENTS[kind], k0 or None)


class SeesawPlan:
    """The Seesaw state machine of the module docstring (window size and LR factor per window start).

    Args:
        k0: microbatches per step before the first growth.
        cap: the most microbatches per step (``--gqc_max_microbatches``).
    """

    def __init__(self, k0: int, cap: int) -> None:
        if k0 < 1 or cap < k0:
            raise ValueError(f"seesaw needs 1 <= k0 <= cap, got k0={k0}, cap={cap}")
        self.k0 = k0
        self.max_growths = int(math.floor(math.log2(cap / k0) + _SLACK))
        self.peak = 0.0
        self.growths = 0

    @property
    def window(self) -> int:
        return self.k0 * 2**self.growths

    def start_window(self, factor: float) -> int:
        """Advance to a window starting where the base schedule's LR factor is ``factor``; its size."""
        self.peak = max(self.peak, factor)
        # peak > 0: a warmup that starts at LR 0 has not "halved" anything yet.
        while (
            self.peak > 0
            and self.growths < self.max_growths
            and factor <= self.peak / 2 ** (self.growths + 1) * (1 + _SLACK)
        ):
            self.growths += 1
        return self.window

    def seesaw_factor(self, factor: float) -> float:
        """The LR factor Seesaw uses for the window started at ``factor`` (after :meth:`start_window`)."""
        if self.growths < self.max_growths:
            return self.peak * 2 ** (-self.growths / 2)
        return factor * 2 ** (self.growths / 2)

    def lr_multiplier(self, factor: float) -> float:
        """What the scheduler's LR is multiplied by at this window's step (1 where the LR is 0)."""
        return self.seesaw_factor(factor) / factor if factor > 0 else 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"peak": self.peak, "growths": self.growths}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.peak = float(state.get("peak", self.peak))
        self.growths = int(state.get("growths", self.growths))


def lr_factor(optimizer: torch.optim.Optimizer) -> float | None:
    """The first param group's LR over its ``initial_lr`` (set by every torch LR scheduler); ``None`` without."""
    group = optimizer.param_groups[0]
    initial = group.get("initial_lr")
    if initial is None or float(initial) == 0.0:
        return None
    return float(group["lr"]) / float(initial)


def step_multiplier(controller: Any, coupling: PowerCoupling | None, k: int, factor: float | None) -> float:
    """The LR multiplier of the step closing a window of ``k`` microbatches started at LR factor ``factor``."""
    plan = getattr(controller, "plan", None)
    if isinstance(plan, SeesawPlan):
        return plan.lr_multiplier(factor) if factor is not None else 1.0
    if coupling is not None:
        return coupling.multiplier(k)
    return 1.0


@contextmanager
def scaled_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> Iterator[None]:
    """Every param group's ``lr`` times ``multiplier`` inside the block, restored exactly afterwards."""
    if multiplier == 1.0:
        yield
        return
    saved = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * multiplier
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, saved, strict=True):
            group["lr"] = lr
