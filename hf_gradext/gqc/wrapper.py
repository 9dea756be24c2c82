"""``GQCOptimizer``: a GQC controller as an optimizer wrapper for hand-written training loops.

Usage (same shape as torch-gqc's wrappers)::

    opt = GQCOptimizer(torch.optim.AdamW(model.parameters()), "gnts", threshold=0.5)
    for batch in loader:
        model(**batch).loss.backward()      # microbatch *mean* loss
        stepped = opt.step()                # averages, clips, steps and zeroes when the controller says so

With token-sum losses pass ``opt.step(num_items=n_label_tokens)``: the window's gradient is then
divided by the window's total items (exact token mean) instead of by the number of microbatches.
Single-process only; the Trainer loop (:mod:`hf_gradext.gqc.loop`) handles DDP.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hf_gradext.gqc.controllers import GNS, GNTS, MHT, SBC, Controller
from hf_gradext.gqc.core import Decision, GQCCore
from hf_gradext.gqc.norms import MicrobatchNormTracker, grads_of, scale_, total_norm
from hf_gradext.gqc.schedules import ThresholdSchedule

_BY_NAME = {"gnts": GNTS, "sbc": SBC, "gns": GNS, "mht": MHT}


class GQCOptimizer:
    """Wraps ``optimizer``; ``step()`` after every microbatch backward, never ``zero_grad()``.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        controller: a :class:`Controller` or its name (``gnts``, ``sbc``, ``gns``, ``mht``).
        threshold: constant threshold, or a :class:`ThresholdSchedule` over microbatches consumed.
        max_microbatches: hard cap per step.
        max_grad_norm: clip the final mean gradient to this norm (None: no clipping).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        controller: Controller | str = "gnts",
        threshold: float | ThresholdSchedule = 1.0,
        max_microbatches: int = 64,
        max_grad_norm: float | None = None,
    ) -> None:
        self.optimizer = optimizer
        ctrl = _BY_NAME[controller]() if isinstance(controller, str) else controller
        schedule = threshold if isinstance(threshold, ThresholdSchedule) else None
        const = 1.0 if schedule is not None else float(threshold)
        self.core = GQCCore(ctrl, schedule=schedule, max_microbatches=max_microbatches, threshold=const)
        self.max_grad_norm = max_grad_norm
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self._tracker = MicrobatchNormTracker(self._params) if ctrl.needs_microbatch_norms else None
        self._mode: str | None = None  # "mean" (divide by k) or "items" (divide by items); fixed per window
        self.last_decision: Decision | None = None

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        # LR schedulers and torch-gqc-style schedules address the wrapped optimizer's groups.
        return self.optimizer.param_groups

    def set_threshold(self, value: float | None) -> None:
        self.core.set_threshold(value)

    def zero_grad(self, set_to_none: bool = True) -> None:
        raise RuntimeError("GQCOptimizer zeroes gradients itself when it steps; remove the zero_grad() call")

    @torch.no_grad()
    def step(self, num_items: float | None = None, metric: float | None = None, samples: int = 0) -> bool:
        """Account for the microbatch just backpropagated; return True if the optimizer stepped.

        Args:
            num_items: loss items of this microbatch when the loss was a *sum* over them.
            metric: this microbatch's loss (needed by ``mht``).
            samples: samples in this microbatch (needed by ``sbc``).
        """
        mode = "mean" if num_items is None else "items"
        if self._mode not in (None, mode):
            raise ValueError("pass num_items for every microbatch of a window or for none")
        self._mode = mode
        self.core.add_microbatch(items=num_items or 0.0, samples=samples)
        grads = grads_of(self._params)
        k = self.core.window_k
        factor = 1.0 / k if mode == "mean" else 1.0 / max(self.core.window_items, 1e-12)
        mean_norm = float(total_norm(grads)) * factor
        mb_norms = []
        if self._tracker is not None:
            mb = self._tracker.pop()
            mb_norms = [mb / num_items if num_items else mb]
        metrics = [float(metric)] if metric is not None else []
        nonfinite = metric is not None and not math.isfinite(float(metric))
        d = self.core.decide(mean_norm, nonfinite=nonfinite, microbatch_norms=mb_norms, metrics=metrics)
        self.last_decision = d
        if d.step:
            scale_(grads, factor)
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self._params, self.max_grad_norm)
            self.optimizer.step()
        if d.step or d.skip:
            self.optimizer.zero_grad(set_to_none=True)
            self._mode = None
        return d.step

    def statistics(self) -> dict[str, float]:
        """Run totals plus the last decision's numbers."""
        out = {f"total_{k}": v for k, v in self.core.totals.items()}
        if self.last_decision is not None:
            out.update(
                microbatches=self.last_decision.k,
                grad_norm=self.last_decision.mean_grad_norm,
                threshold=self.last_decision.threshold,
            )
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "gqc": self.core.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.core.load_state_dict(state["gqc"])
