"""torch-gqc's wrapper factories for :class:`GQCOptimizer`: same names, arguments and curves.

Each returns ``(GQCOptimizer, schedule)`` as torch-gqc's ``make_*`` do; the quickstart loop is unchanged::

    opt, schedule = make_gnts_with_cosine_annealing_schedule(torch.optim.AdamW(...), 10_000, 500)
    for batch in loader:
        model(**batch).loss.backward()
        opt.step()
        schedule.step()          # once per microbatch

Differences from torch-gqc 0.10.4, by design:

* the controller's threshold is a :class:`~hf_gradext.gqc.schedules.ThresholdSchedule` over microbatches
  consumed, read by the wrapper itself: ``schedule.step()`` drives the learning rate and weight decay
  only. Stepped once per microbatch (torch-gqc's quickstart) all three follow torch-gqc's values exactly;
* past ``num_training_steps`` every curve holds its end value (torch-schedule-anything keeps evaluating
  its formula: the quarter cosine of the LR goes below 0 there);
* ``make_mht_with_warmup_schedule`` (not exported by torch-gqc either) and the GNR factories are not
  provided: hf_gradext's ``mht`` takes a fixed confidence, and there is no GNR controller.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hf_gradext.gqc import schedules as S
from hf_gradext.gqc.wrapper import GQCOptimizer


class ParamGroupLambda:
    """``group[key] = initial * fn(t)`` for every param group, ``t`` = ``step()`` calls (LambdaLR for any key)."""

    def __init__(self, optimizer: torch.optim.Optimizer, key: str, fn: Callable[[int], float]) -> None:
        self.optimizer, self.key, self.fn = optimizer, key, fn
        self.base = [g[key] for g in optimizer.param_groups]
        self.t = 0
        self._apply()

    def _apply(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base, strict=True):
            group[self.key] = base * self.fn(self.t)

    def step(self) -> None:
        self.t += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "base": list(self.base)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t, self.base = state["t"], list(state["base"])
        self._apply()


class SynchronousSchedule:
    """Steps several schedules together (torch-schedule-anything's ``SynchronousSchedule``)."""

    def __init__(self, schedules: list[Any]) -> None:
        self.schedules = schedules

    def step(self) -> None:
        for s in self.schedules:
            s.step()

    def state_dict(self) -> dict[str, Any]:
        return {"schedules": [s.state_dict() for s in self.schedules]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for s, st in zip(self.schedules, state["schedules"], strict=True):
            s.load_state_dict(st)


def _schedule(opt: GQCOptimizer, lr: Callable[[int], float], weight_decay: Callable[[int], float] | None):
    parts: list[Any] = [torch.optim.lr_scheduler.LambdaLR(opt, lr)]
    if weight_decay is not None:
        parts.append(ParamGroupLambda(opt, "weight_decay", weight_decay))
    return SynchronousSchedule(parts)


def _constant(value: float) -> Callable[[int], float]:
    return lambda t: value


def make_gnts_with_cosine_annealing_schedule(
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    num_warmup_steps: int,
    initial_threshold: float = 0.95,
    final_threshold: float = 0.25,
    warmup_multiplier: float = 10,
    max_batch_draws: int = 64,
    distributed_mode: str | None = None,
) -> tuple[GQCOptimizer, SynchronousSchedule]:
    """GNTS; LR: warmup then constant; threshold: inverse warmup then quarter cosine; weight decay:
    warmup then quarter cosine to 0."""
    thr = S.cosine_annealing_with_inverse_warmup(
        initial_threshold, final_threshold, num_warmup_steps, num_training_steps, warmup_multiplier
    )
    opt = GQCOptimizer(optimizer, "gnts", thr, max_batch_draws, distributed_mode=distributed_mode)
    lr = S.constant_with_warmup(1.0, num_warmup_steps)
    wd = S.cosine_annealing_with_warmup(1.0, 0.0, num_warmup_steps, num_training_steps)
    return opt, _schedule(opt, lr, wd)


def make_gnts_with_cosine_annealing_schedule_conventional_lr(
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    num_warmup_steps: int,
    initial_threshold: float = 0.95,
    final_threshold: float = 0.25,
    warmup_multiplier: float = 10,
    max_batch_draws: int = 64,
    distributed_mode: str | None = None,
) -> tuple[GQCOptimizer, SynchronousSchedule]:
    """GNTS; LR: warmup then quarter cosine to 0; threshold as above; weight decay not scheduled."""
    thr = S.cosine_annealing_with_inverse_warmup(
        initial_threshold, final_threshold, num_warmup_steps, num_training_steps, warmup_multiplier
    )
    opt = GQCOptimizer(optimizer, "gnts", thr, max_batch_draws, distributed_mode=distributed_mode)
    return opt, _schedule(
        opt, S.cosine_annealing_with_warmup(1.0, 0.0, num_warmup_steps, num_training_steps), None
    )


def make_sbc_with_polynomial_schedule(
    optimizer: torch.optim.Optimizer,
    physical_batch_size: int,
    initial_batch_size: int,
    final_batch_size: int,
    num_training_steps: int,
    num_warmup_steps: int,
    polynomial_power: float = 2.0,
    max_batch_draws: int = 64,
    distributed_mode: str | None = None,
) -> tuple[GQCOptimizer, SynchronousSchedule]:
    """SBC; logical batch: warmup from 0 then polynomial; LR: warmup then constant; weight decay:
    warmup then quarter cosine to 0."""
    batch = S.polynomial_schedule_with_warmup(
        initial_batch_size, final_batch_size, num_warmup_steps, num_training_steps, polynomial_power
    )
    opt = GQCOptimizer(
        optimizer,
        "sbc",
        batch,
        max_batch_draws,
        physical_batch_size=physical_batch_size,
        distributed_mode=distributed_mode,
    )
    lr = S.constant_with_warmup(1.0, num_warmup_steps)
    wd = S.cosine_annealing_with_warmup(1.0, 0.0, num_warmup_steps, num_training_steps)
    return opt, _schedule(opt, lr, wd)


def make_sbc_with_polynomial_schedule_conventional_lr(
    optimizer: torch.optim.Optimizer,
    physical_batch_size: int,
    initial_batch_size: int,
    final_batch_size: int,
    num_training_steps: int,
    num_warmup_steps: int,
    polynomial_power: float = 2.0,
    max_batch_draws: int = 64,
    distributed_mode: str | None = None,
) -> tuple[GQCOptimizer, SynchronousSchedule]:
    """SBC; logical batch as above; LR: warmup then quarter cosine to 0; weight decay constant."""
    batch = S.polynomial_schedule_with_warmup(
        initial_batch_size, final_batch_size, num_warmup_steps, num_training_steps, polynomial_power
    )
    opt = GQCOptimizer(
        optimizer,
        "sbc",
        batch,
        max_batch_draws,
        physical_batch_size=physical_batch_size,
        distributed_mode=distributed_mode,
    )
    lr = S.cosine_annealing_with_warmup(1.0, 0.0, num_warmup_steps, num_training_steps)
    return opt, _schedule(opt, lr, _constant(1.0))


def make_gns_with_cosine_annealing_schedule(
    optimizer: torch.optim.Optimizer,
    initial_tolerance: float,
    final_tolerance: float,
    num_training_steps: int,
    num_warmup_steps: int,
    warmup_multiplier: float = 10,
    max_batch_draws: int = 64,
    distributed_mode: str | None = None,
) -> tuple[GQCOptimizer, SynchronousSchedule]:
    """GNS; LR: warmup then quarter cosine to 0; tolerance: inverse warmup then quarter cosine."""
    tol = S.cosine_annealing_with_inverse_warmup(
        initial_tolerance, final_tolerance, num_warmup_steps, num_training_steps, warmup_multiplier
    )
    opt = GQCOptimizer(optimizer, "gns", tol, max_batch_draws, distributed_mode=distributed_mode)
    return opt, _schedule(
        opt, S.cosine_annealing_with_warmup(1.0, 0.0, num_warmup_steps, num_training_steps), None
    )


def make_gns_default(
    optimizer: torch.optim.Optimizer,
    tolerance: float,
    num_training_steps: int,
    num_warmup_steps: int,
    max_batch_draws: int = 64,
    distributed_mode: str | None = None,
) -> tuple[GQCOptimizer, SynchronousSchedule]:
    """GNS; LR: warmup then quarter cosine to 0; tolerance: inverse warmup (x20, torch-gqc's default) to constant."""
    tol = S.constant_with_inverse_warmup(tolerance, num_warmup_steps)
    opt = GQCOptimizer(optimizer, "gns", tol, max_batch_draws, distributed_mode=distributed_mode)
    return opt, _schedule(
        opt, S.cosine_annealing_with_warmup(1.0, 0.0, num_warmup_steps, num_training_steps), None
    )
