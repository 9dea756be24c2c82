"""``GQCOptimizer``: a GQC controller as an optimizer wrapper for hand-written training loops.

Usage (same shape as torch-gqc's wrappers)::

    opt = GQCOptimizer(torch.optim.AdamW(model.parameters()), "gnts", threshold=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, t / 100))  # any torch scheduler
    for batch in loader:
        model(**batch).loss.backward()      # microbatch *mean* loss
        stepped = opt.step()                # averages, clips, steps and zeroes when the controller says so
        sched.step()                        # per microbatch (data axis), as in torch-gqc's quickstart

With token-sum losses pass ``opt.step(num_items=n_label_tokens)``: the window's gradient is then
divided by the window's total items (exact token mean) instead of by the number of microbatches.
``sbc`` needs each microbatch's sample count (``step(samples=B)`` or ``physical_batch_size=B``), ``mht``
its loss (``step(loss.item())``), ``gns_sample`` its per-sample squared gradient norms
(``step(sample_sq_norms=sq)``, a (B,) tensor); a missing input raises instead of silently stepping
only at the cap.

``GQCOptimizer`` is a ``torch.optim.Optimizer`` whose ``param_groups``, ``state`` and ``defaults`` *are*
the wrapped optimizer's (same objects, not copies), so LR schedulers attach to it and anything they
write reaches the wrapped optimizer. Other attributes fall through to the wrapped optimizer.

Multi-process (``torch.distributed`` initialized, world size > 1): the model must be DDP-wrapped with
gradients synchronized on every backward (DDP's default; no ``no_sync``), which is torch-gqc's
``distributed_mode="replicated"``. Each ``step()`` then sums one small float64 vector over the ranks
(the per-rank gradient norms, samples, items, gns norms, mht losses, per-sample statistics) so every
rank decides from identical numbers: the same decisions on every rank, one all-reduce per microbatch.
``distributed_mode="sharded"`` (FSDP) is refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from hf_gradext.errors import UserFacingError
from hf_gradext.gqc import reporting
from hf_gradext.gqc.controllers import GNS, GNTS, MHT, SBC, Controller, GNSSample
from hf_gradext.gqc.core import Decision, GQCCore
from hf_gradext.gqc.noise import SampleNormStats, sample_norm_vector
from hf_gradext.gqc.norms import MicrobatchNormTracker, grads_of, scale_, total_norm
from hf_gradext.gqc.schedules import ThresholdSchedule

_BY_NAME: dict[str, type[Controller]] = {
    "gnts": GNTS,
    "sbc": SBC,
    "gns": GNS,
    "mht": MHT,
    "gns_sample": GNSSample,
}

# Layout of the per-microbatch vector summed over ranks (W = world size).
_NONFINITE, _ITEMS, _SAMPLES, _STATS = 0, 1, 2, 3  # _STATS.._STATS+3: SampleNormStats
_HEAD = _STATS + 4  # then W per-rank ||grad||^2, W gns norms, W mht metrics


def _world(distributed_mode: str | None, group: Any) -> tuple[int, int]:
    """(world size, rank) the wrapper reduces over; (1, 0) for one process."""
    if distributed_mode not in (None, "replicated", "sharded"):
        raise UserFacingError(f"distributed_mode={distributed_mode!r}: use None (auto) or 'replicated' (DDP)")
    if distributed_mode == "sharded":
        raise UserFacingError(
            "GQCOptimizer does not support sharded (FSDP) gradients: its norms and rescale assume full, "
            "DDP-synchronized gradients; wrap the model in DistributedDataParallel and use 'replicated'"
        )
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        if distributed_mode == "replicated":
            raise UserFacingError(
                "distributed_mode='replicated' but torch.distributed is not initialized; "
                "call init_process_group first or drop distributed_mode"
            )
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _sample_norm_subset(
    params: Iterable[torch.nn.Parameter] | None, optimized: list[torch.nn.Parameter], ctrl: Controller
) -> list[torch.nn.Parameter] | None:
    """The checked ``sample_norm_params`` (None when not given or when they are all of ``optimized``)."""
    if params is None:
        return None
    subset = list(params)
    if not ctrl.needs_sample_norms:
        raise UserFacingError(
            f"GQCOptimizer: sample_norm_params applies to the gns_sample controller only (got {ctrl.name}); drop it"
        )
    ids = {id(p) for p in optimized}
    if not subset or any(id(p) not in ids for p in subset):
        raise UserFacingError(
            "GQCOptimizer: sample_norm_params must be a non-empty subset of the wrapped optimizer's parameters"
        )
    return None if len({id(p) for p in subset}) == len(ids) else subset


class GQCOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer``; ``step()`` after every microbatch backward, never ``zero_grad()``.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        controller: a :class:`Controller` or its name (``gnts``, ``sbc``, ``gns``, ``gns_sample``, ``mht``).
        threshold: constant threshold, or a :class:`ThresholdSchedule` over microbatches consumed.
        max_microbatches: hard cap per step.
        max_grad_norm: clip the final mean gradient to this norm (None: no clipping).
        physical_batch_size: samples per microbatch per rank, for ``sbc`` when ``step`` gets no ``samples``
            (torch-gqc's ``OptimizerWrapperSBC(physical_batch_size=...)``).
        distributed_mode: None (detect: reduce over the default group when torch.distributed is
            initialized) or ``"replicated"`` (DDP); ``"sharded"`` raises.
        process_group: the group to reduce over (default: the world).
        sample_norm_params: ``gns_sample`` with per-sample norms of only these parameters (a subset of the
            optimizer's, e.g. the LayerNorms'): the window's mean-gradient norm for the noise estimate is
            then taken over them too (:mod:`hf_gradext.gqc.sample_norms`). None: the norms cover every
            parameter of the optimizer.
    """

    # Optimizer.__init__ is deliberately not called: it would copy the param groups into new dicts, and a
    # scheduler writing ``lr`` to those copies would never reach the wrapped optimizer.
    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        controller: Controller | str = "gnts",
        threshold: float | ThresholdSchedule = 1.0,
        max_microbatches: int = 64,
        max_grad_norm: float | None = None,
        *,
        physical_batch_size: int | None = None,
        distributed_mode: str | None = None,
        process_group: Any = None,
        sample_norm_params: Iterable[torch.nn.Parameter] | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UserFacingError(
                f"GQCOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(controller, str) and controller not in _BY_NAME:
            raise UserFacingError(
                f"unknown GQC controller {controller!r}; choose one of {', '.join(_BY_NAME)}"
            )
        if physical_batch_size is not None and physical_batch_size < 1:
            raise UserFacingError("physical_batch_size must be a positive number of samples per microbatch")
        self.optimizer = optimizer
        ctrl = _BY_NAME[controller]() if isinstance(controller, str) else controller
        schedule = threshold if isinstance(threshold, ThresholdSchedule) else None
        const = 1.0 if schedule is not None else float(threshold)
        self.core = GQCCore(ctrl, schedule=schedule, max_microbatches=max_microbatches, threshold=const)
        self.max_grad_norm = max_grad_norm
        self.physical_batch_size = physical_batch_size
        self.process_group = process_group
        self.world_size, self.rank = _world(distributed_mode, process_group)
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self._tracker = MicrobatchNormTracker(self._params) if ctrl.needs_microbatch_norms else None
        self._subset = _sample_norm_subset(sample_norm_params, self._params, ctrl)
        self._mode: str | None = None  # "mean" (divide by k) or "items" (divide by items); fixed per window
        self.last_decision: Decision | None = None
        self.last_num_draws: int | None = None  # microbatches of the last optimizer step (torch-gqc)
        self.last_grad_norm: float | None = None  # its mean-gradient norm, before clipping (torch-gqc)

    # ------------------------------------------------------------------ the wrapped optimizer's state
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: fall through to the wrapped optimizer (torch-gqc does too).
        optimizer = self.__dict__.get("optimizer")
        if optimizer is None:
            raise AttributeError(name)
        return getattr(optimizer, name)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()  # not Optimizer's (defaults/state/param_groups only)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"GQCOptimizer({self.core.controller.name}, {self.optimizer!r})"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self._tracker is not None:  # hooks on the new parameters too
            self._tracker.remove()
            self._tracker = MicrobatchNormTracker(self._params)

    # Hooks on the wrapper are hooks on the wrapped optimizer: they fire when it really steps / saves.
    def register_step_pre_hook(self, hook):  # type: ignore[override]
        return self.optimizer.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook):  # type: ignore[override]
        return self.optimizer.register_step_post_hook(hook)

    def register_state_dict_pre_hook(self, hook, prepend: bool = False):  # type: ignore[override]
        return self.optimizer.register_state_dict_pre_hook(hook, prepend)

    def register_state_dict_post_hook(self, hook, prepend: bool = False):  # type: ignore[override]
        return self.optimizer.register_state_dict_post_hook(hook, prepend)

    def register_load_state_dict_pre_hook(self, hook, prepend: bool = False):  # type: ignore[override]
        return self.optimizer.register_load_state_dict_pre_hook(hook, prepend)

    def register_load_state_dict_post_hook(self, hook, prepend: bool = False):  # type: ignore[override]
        return self.optimizer.register_load_state_dict_post_hook(hook, prepend)

    # ------------------------------------------------------------------ GQC
    def set_threshold(self, value: float | None) -> None:
        self.core.set_threshold(value)

    @property
    def num_draws(self) -> int:
        """Microbatches in the open window (torch-gqc)."""
        return self.core.window_k

    def zero_grad(self, set_to_none: bool = True) -> None:
        raise RuntimeError("GQCOptimizer zeroes gradients itself when it steps; remove the zero_grad() call")

    def _inputs(
        self,
        metric: float | None,
        num_items: float | None,
        samples: int | None,
        sample_sq_norms: torch.Tensor | None,
        sample_weights: torch.Tensor | None,
    ) -> tuple[float, torch.Tensor | None]:
        """Check what the controller needs; return (this rank's samples, its per-sample statistics)."""
        ctrl = self.core.controller
        if callable(metric):
            raise UserFacingError(
                "GQCOptimizer.step does not take a closure; call loss.backward() before step()"
            )
        if ctrl.needs_metrics and metric is None:
            raise UserFacingError(
                "gqc mht tests the microbatch losses: call opt.step(loss.item()) every microbatch"
            )
        if samples is None:
            samples = self.physical_batch_size
        if samples is None and sample_sq_norms is not None:
            samples = int(sample_sq_norms.shape[0])
        if isinstance(ctrl, SBC) and not samples:
            raise UserFacingError(
                "gqc sbc counts samples: call opt.step(samples=len(batch)) or build "
                "GQCOptimizer(..., physical_batch_size=B)"
            )
        stats = None
        if ctrl.needs_sample_norms:
            if sample_sq_norms is None:
                raise UserFacingError(
                    "gqc gns_sample needs this microbatch's per-sample squared gradient norms: "
                    "opt.step(sample_sq_norms=sq), sq a (B,) tensor (hf_gradext.grad.per_sample_grad_norms(...)**2)"
                )
            if sample_weights is None:
                if num_items is not None:
                    raise UserFacingError(
                        "with num_items (token-sum losses) gns_sample needs sample_weights=(B,) label-token "
                        "counts, and per-sample norms of each sample's own mean token loss"
                    )
                # Mean loss: the window gradient is the mean of microbatch means, weight 1/B per sample.
                sample_weights = torch.full_like(sample_sq_norms, 1.0 / max(sample_sq_norms.shape[0], 1))
            stats = sample_norm_vector(sample_sq_norms, sample_weights)
        return float(samples or 0), stats

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        metric: float | None = None,
        *,
        num_items: float | None = None,
        samples: int | None = None,
        sample_sq_norms: torch.Tensor | None = None,
        sample_weights: torch.Tensor | None = None,
    ) -> bool:
        """Account for the microbatch just backpropagated; return True if the optimizer stepped.

        Args:
            metric: this microbatch's loss (needed by ``mht``; a non-finite value skips the window).
            num_items: loss items of this microbatch when the loss was a *sum* over them.
            samples: samples in this microbatch on this rank (needed by ``sbc``).
            sample_sq_norms: (B,) per-sample squared gradient norms (needed by ``gns_sample``), each the
                gradient of that sample's loss in the microbatch loss's convention (mean loss: ``l_i``).
            sample_weights: (B,) their raw weights in the window gradient (token counts with ``num_items``).
        """
        mode = "mean" if num_items is None else "items"
        if self._mode not in (None, mode):
            raise ValueError("pass num_items for every microbatch of a window or for none")
        local_samples, stats = self._inputs(metric, num_items, samples, sample_sq_norms, sample_weights)
        self._mode = mode
        grads = grads_of(self._params)
        world, ctrl = self.world_size, self.core.controller
        device = self._params[0].device if self._params else torch.device("cpu")
        # Everything the decision needs, in one float64 vector: one host read (and one all-reduce).
        subset_at = _HEAD + 3 * world  # ||grad||^2 over sample_norm_params, summed over ranks / world
        vec = torch.zeros(subset_at + (self._subset is not None), dtype=torch.float64, device=device)
        metric_f = float(metric) if metric is not None else 0.0
        vec[_NONFINITE] = float(metric is not None and not math.isfinite(metric_f))
        vec[_ITEMS] = float(num_items or 0.0)
        vec[_SAMPLES] = local_samples
        if stats is not None:
            vec[_STATS : _STATS + 4] = stats.to(device)
        vec[_HEAD + self.rank] = total_norm(grads).to(device=device, dtype=torch.float64) ** 2
        if self._tracker is not None:
            mb = self._tracker.pop_tensor()
            vec[_HEAD + world + self.rank] = mb / num_items if num_items else mb
        vec[_HEAD + 2 * world + self.rank] = metric_f
        if self._subset is not None:
            vec[subset_at] = (
                total_norm(grads_of(self._subset)).to(device=device, dtype=torch.float64) ** 2 / world
            )
        if world > 1:
            torch.distributed.all_reduce(vec, group=self.process_group)
        vals = vec.tolist()
        grad_sq = vals[_HEAD : _HEAD + world]
        if world > 1 and max(grad_sq) - min(grad_sq) > 1e-5 * max(max(grad_sq), 1e-30):
            raise UserFacingError(
                "GQCOptimizer: gradients differ between ranks; wrap the model in DistributedDataParallel "
                "and let every backward synchronize (no no_sync) so all ranks test the same gradient"
            )

        self.core.add_microbatch(items=vals[_ITEMS], samples=int(vals[_SAMPLES]))
        k = self.core.window_k
        # DDP averages gradients over ranks: .grad = (1/W) sum_r; the exact token mean is W/items of it.
        factor = 1.0 / k if mode == "mean" else world / max(self.core.window_items, 1e-12)
        mean_norm = math.sqrt(max(grad_sq[0], 0.0)) * factor if math.isfinite(grad_sq[0]) else math.nan
        reduced_stats = SampleNormStats.from_vector(vals[_STATS : _STATS + 4]) if stats is not None else None
        d = self.core.decide(
            mean_norm,
            nonfinite=vals[_NONFINITE] > 0,
            microbatch_norms=vals[_HEAD + world : _HEAD + 2 * world] if self._tracker is not None else (),
            metrics=vals[_HEAD + 2 * world : subset_at] if ctrl.needs_metrics else (),
            sample_stats=reduced_stats,
            sample_mean_grad_norm=(
                math.sqrt(max(vals[subset_at], 0.0)) * factor if self._subset is not None else None
            ),
        )
        self.last_decision = d
        if d.step:
            scale_(grads, factor)
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self._params, self.max_grad_norm)
            self.optimizer.step()
            self.last_num_draws, self.last_grad_norm = d.k, mean_norm
        if d.step or d.skip:
            self.optimizer.zero_grad(set_to_none=True)
            self._mode = None
        return d.step

    # ------------------------------------------------------------------ reporting, checkpoints
    def statistics(self, behavior: str = "verbose", aggregate_behavior: str = "mean") -> dict[str, Any]:
        """torch-gqc's statistics keys (see :mod:`hf_gradext.gqc.reporting`); ``verbose`` adds hf_gradext's."""
        if behavior not in ("verbose", "vital"):
            raise ValueError(f"behavior must be 'verbose' or 'vital', got {behavior!r}")
        vital = behavior == "vital"
        core, ctrl = self.core, self.core.controller
        out: dict[str, Any] = {
            "num_batches": int(core.totals["microbatches"]),
            "num_steps": int(core.totals["steps"]),
        }
        if self.last_num_draws is not None:
            out.update(last_num_draws=self.last_num_draws, last_grad_norm=self.last_grad_norm)
        if not vital:
            out["num_draws"] = core.window_k
            if self.physical_batch_size is not None:
                out["physical_batch_size"] = self.physical_batch_size
        out.update(reporting.controller_statistics(ctrl, vital, aggregate_behavior))
        out.update(reporting.hyperparameters(self.param_groups, aggregate_behavior))
        out[ctrl.threshold_name] = core.threshold_at(core.totals["microbatches"])  # what the next draw uses
        if not vital:
            out.update({f"total_{k}": v for k, v in core.totals.items()})
            if self.last_decision is not None:
                out.update(
                    microbatches=self.last_decision.k,
                    grad_norm=self.last_decision.mean_grad_norm,
                    threshold=self.last_decision.threshold,
                )
        return out

    def vital_statistics(self, aggregate_behavior: str = "mean") -> dict[str, Any]:
        """The short form for progress bars (torch-gqc's ``vital_statistics``)."""
        return self.statistics("vital", aggregate_behavior)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"optimizer": self.optimizer.state_dict(), "gqc": self.core.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        self.optimizer.load_state_dict(state["optimizer"])
        self.core.load_state_dict(state["gqc"])
