"""Window bookkeeping shared by the Trainer loop and the custom-loop wrapper.

``GQCCore`` turns one microbatch's reduced numbers into a decision (step / draw again / skip the
window as non-finite), applies the hard cap, reads the threshold schedule at the current data
position, keeps run totals, and serializes all of it for checkpoints. It does no tensor work (per-sample
norms given as a tensor are passed through to the controller).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from hf_gradext.gqc.controllers import Controller, Observation
from hf_gradext.gqc.noise import SampleNormStats
from hf_gradext.gqc.schedules import ThresholdSchedule

# Counters saved in checkpoints and summarized at the end of a run.
TOTAL_KEYS = (
    "microbatches",  # drawn, including those of skipped windows
    "items",  # label tokens (loss items) drawn
    "tokens",  # input tokens drawn
    "steps",  # optimizer steps taken
    "capped_steps",  # steps forced by the cap
    "forced_steps",  # steps forced by the end of the data / budget
    "skipped_windows",  # windows dropped because a gradient or loss was non-finite
    "skipped_microbatches",
)


@dataclass
class Decision:
    """Outcome of one microbatch. ``step`` and ``skip`` are never both True."""

    step: bool
    skip: bool
    reason: str  # "controller", "cap", "end", "nonfinite" or "" (keep drawing)
    k: int  # microbatches in the window
    items: float  # loss items (label tokens) in the window, summed over ranks
    mean_grad_norm: float
    threshold: float


class GQCCore:
    """Decision + bookkeeping for GQC windows.

    Args:
        controller: the decision rule.
        schedule: threshold as a function of microbatches consumed (``None``: constant ``threshold``).
        max_microbatches: hard cap on microbatches per window.
        threshold: constant threshold when ``schedule`` is None.
    """

    def __init__(
        self,
        controller: Controller,
        schedule: ThresholdSchedule | None = None,
        max_microbatches: int = 64,
        threshold: float = 1.0,
    ) -> None:
        if max_microbatches < 1:
            raise ValueError("max_microbatches must be >= 1")
        self.controller = controller
        self.schedule = schedule
        self.max_microbatches = max_microbatches
        self.threshold_override: float | None = None if schedule is not None else threshold
        self.totals: dict[str, float] = dict.fromkeys(TOTAL_KEYS, 0)
        self._reset_window()

    # ------------------------------------------------------------------ window
    def _reset_window(self) -> None:
        self.window_k = 0
        self.window_items = 0.0
        self.window_samples = 0

    def set_threshold(self, value: float | None) -> None:
        """Pin the threshold to ``value`` from now on (``None`` returns to the schedule)."""
        if value is None and self.schedule is None:
            raise ValueError("no schedule to return to")
        self.threshold_override = value

    def threshold_at(self, position: float) -> float:
        if self.threshold_override is not None:
            return self.threshold_override
        assert self.schedule is not None
        return self.schedule(position)

    def add_microbatch(self, items: float = 0.0, tokens: float = 0.0, samples: int = 0) -> None:
        """Count one drawn microbatch (numbers summed over ranks) into the window and the totals."""
        self.window_k += 1
        self.window_items += items
        self.window_samples += samples
        self.totals["microbatches"] += 1
        self.totals["items"] += items
        self.totals["tokens"] += tokens

    def decide(
        self,
        mean_grad_norm: float,
        *,
        position: float | None = None,
        nonfinite: bool = False,
        microbatch_norms: list[float] | tuple[float, ...] = (),
        metrics: list[float] | tuple[float, ...] = (),
        force: bool = False,
        sample_stats: SampleNormStats | None = None,
        sample_sq_norms: torch.Tensor | None = None,
        sample_weights: torch.Tensor | None = None,
        sample_norms_measured: bool = True,
        lr_factor: float | None = None,
        sample_mean_grad_norm: float | None = None,
    ) -> Decision:
        """Decide on the window after ``add_microbatch``; a step or skip closes the window.

        Args:
            mean_grad_norm: norm of the window's mean gradient (global).
            position: data position for the schedule (default: microbatches consumed before this one).
            nonfinite: a gradient or the loss of this microbatch is NaN/inf.
            microbatch_norms / metrics: per-rank inputs of gns / mht.
            force: step regardless of the controller (end of data or budget).
            sample_stats / sample_sq_norms / sample_weights: this microbatch's per-sample squared
                gradient norms for gns_sample, reduced over ranks (``SampleNormStats``) or as (B,) tensors
                (one process); see :class:`~hf_gradext.gqc.controllers.Observation`.
            sample_norms_measured: False when ``sample_stats`` carries only count and weights (the
                microbatch was not captured, ``--gqc_sample_norm_every``).
            lr_factor: the LR scheduler's LR over its initial LR at the window's first microbatch (seesaw).
            sample_mean_grad_norm: the window's mean-gradient norm over only the parameters the per-sample
                norms cover, when that is a subset (``--gqc_sample_norm_layers``; global).
        """
        if self.window_k < 1:
            raise RuntimeError("decide() called before add_microbatch()")
        position = self.totals["microbatches"] - 1 if position is None else position
        obs = Observation(
            k=self.window_k,
            mean_grad_norm=mean_grad_norm,
            threshold=self.threshold_at(position),
            samples=self.window_samples,
            microbatch_norms=list(microbatch_norms),
            metrics=list(metrics),
            sample_stats=sample_stats,
            sample_sq_norms=sample_sq_norms,
            sample_weights=sample_weights,
            sample_norms_measured=sample_norms_measured,
            lr_factor=lr_factor,
            sample_mean_grad_norm=sample_mean_grad_norm,
        )
        nonfinite = nonfinite or not math.isfinite(mean_grad_norm)
        if nonfinite:
            reason = "nonfinite"
        else:
            ok = self.controller.decide(obs)
            if ok:
                reason = "controller"
            elif self.window_k >= self.max_microbatches:
                reason = "cap"
            elif force:
                reason = "end"
            else:
                reason = ""
        decision = Decision(
            step=reason in ("controller", "cap", "end"),
            skip=reason == "nonfinite",
            reason=reason,
            k=self.window_k,
            items=self.window_items,
            mean_grad_norm=mean_grad_norm,
            threshold=self.controller.effective_threshold(obs),
        )
        if decision.step or decision.skip:
            self._close_window(decision)
        return decision

    def _close_window(self, d: Decision) -> None:
        if d.step:
            self.totals["steps"] += 1
            self.totals["capped_steps"] += d.reason == "cap"
            self.totals["forced_steps"] += d.reason == "end"
        else:
            self.totals["skipped_windows"] += 1
            self.totals["skipped_microbatches"] += d.k
        self.controller.end_window(d.step)
        self._reset_window()

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        if self.window_k:
            # Partial-window gradients live in .grad, not in this state: saving now would lose them.
            raise RuntimeError("GQC state can only be saved between windows (right after a step)")
        return {
            "controller": self.controller.name,
            "controller_state": self.controller.state_dict(),
            "totals": dict(self.totals),
            "threshold_override": self.threshold_override,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("controller") != self.controller.name:
            raise ValueError(
                f"checkpoint was written by controller {state.get('controller')!r}, "
                f"this run uses {self.controller.name!r}"
            )
        self.controller.load_state_dict(state.get("controller_state", {}))
        self.totals.update(state.get("totals", {}))
        self.threshold_override = state.get("threshold_override", self.threshold_override)
        self._reset_window()
