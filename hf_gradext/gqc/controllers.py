"""GQC controllers: after each microbatch, decide "step now" or "draw another microbatch".

Controllers are plain Python: they see one :class:`Observation` per microbatch (numbers already
reduced over ranks, so every rank decides the same) and return a bool. Tensor work (norms,
averaging, clipping, the optimizer step) lives in :mod:`hf_gradext.gqc.core` users: the Trainer loop
(:mod:`hf_gradext.gqc.loop`) and the custom-loop wrapper (:mod:`hf_gradext.gqc.wrapper`).

The hard cap on microbatches per step and the non-finite check are applied by the caller, not here,
so every controller gets them the same way.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_gradext.errors import UserFacingError
from hf_gradext.gqc.lr_coupling import SeesawPlan
from hf_gradext.gqc.noise import NoiseEstimate, SampleNormStats, estimate_noise, sample_norm_stats


@dataclass
class Observation:
    """What a controller sees after microbatch ``k`` of the current window.

    Attributes:
        k: microbatches drawn in this window so far (per rank; ranks draw in lockstep).
        mean_grad_norm: L2 norm of the window's mean gradient (global under DDP).
        threshold: the scheduled controller value at this point of the data.
        samples: samples in the window so far (summed over ranks).
        microbatch_norms: norm of this microbatch's own mean gradient, one per rank (gns).
        metrics: this microbatch's mean loss, one per rank (mht).
        sample_stats: this microbatch's per-sample squared-norm statistics summed over ranks (gns_sample;
            what a DDP loop passes after its reduction).
        sample_sq_norms: (B,) this microbatch's per-sample squared gradient norms (gns_sample, one
            process; used when ``sample_stats`` is None).
        sample_weights: (B,) raw weights of those samples in the window's mean gradient (None: equal).
        sample_norms_measured: False when ``sample_stats`` holds only the count and weights of this
            microbatch (its per-sample norms were not captured, ``--gqc_sample_norm_every``): gns_sample
            imputes ``sq_sum`` from the last measured microbatch.
        lr_factor: the LR scheduler's factor (LR / initial LR) at the window's first microbatch (seesaw).
        sample_mean_grad_norm: norm of the window's mean gradient over only the parameters the per-sample
            norms cover (``--gqc_sample_norm_layers``); ``None``: they cover every parameter, use
            ``mean_grad_norm``.
    """

    k: int
    mean_grad_norm: float
    threshold: float
    samples: int = 0
    microbatch_norms: list[float] = field(default_factory=list)
    metrics: list[float] = field(default_factory=list)
    sample_stats: SampleNormStats | None = None
    sample_sq_norms: torch.Tensor | None = None
    sample_weights: torch.Tensor | None = None
    sample_norms_measured: bool = True
    lr_factor: float | None = None
    sample_mean_grad_norm: float | None = None


class Controller(ABC):
    """Base class: ``decide`` per microbatch, ``end_window`` after the window steps or is skipped."""

    name: str = ""
    threshold_name: str = "threshold"  # torch-gqc's name of the scheduled value (statistics() key)
    needs_microbatch_norms: bool = False
    needs_metrics: bool = False
    needs_sample_norms: bool = False
    needs_lr_factor: bool = False

    @abstractmethod
    def decide(self, obs: Observation) -> bool:
        """Return True to step the optimizer on the current window."""

    def effective_threshold(self, obs: Observation) -> float:
        """The number the decision compared against (for logs)."""
        return obs.threshold

    def measures(self, microbatch_index: int) -> bool:
        """Whether microbatch ``microbatch_index`` of the run needs per-sample norms (``needs_sample_norms``)."""
        return True

    def end_window(self, stepped: bool) -> None:  # noqa: B027 - optional hook, stateless controllers skip it
        """Forget per-window history (called after a step or a skipped window)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


class GNTS(Controller):
    """Gradient Norm Threshold Scheduler: step iff ``||sum_k g|| / k <= threshold``.

    In ``relative`` mode the threshold is ``value * r`` where ``r`` is an EMA of the window's norm at
    its first draw (a single microbatch's mean-gradient norm), so the value is scale-free.
    """

    name = "gnts"
    threshold_name = "gradient_norm_threshold"

    def __init__(self, mode: str = "absolute", ema: float = 0.1) -> None:
        if mode not in ("absolute", "relative"):
            raise ValueError(f"mode must be 'absolute' or 'relative', got {mode!r}")
        self.mode = mode
        self.ema = ema
        self.reference: float | None = None  # EMA of single-microbatch norms (relative mode)

    def effective_threshold(self, obs: Observation) -> float:
        if self.mode == "absolute":
            return obs.threshold
        return obs.threshold * (self.reference if self.reference is not None else obs.mean_grad_norm)

    def decide(self, obs: Observation) -> bool:
        if self.mode == "relative" and obs.k == 1 and math.isfinite(obs.mean_grad_norm):
            r = obs.mean_grad_norm
            self.reference = r if self.reference is None else (1 - self.ema) * self.reference + self.ema * r
        return obs.mean_grad_norm <= self.effective_threshold(obs)

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference = state.get("reference")


class SBC(Controller):
    """Scheduled Batch Controller: step once the window holds >= ``threshold`` samples."""

    name = "sbc"
    threshold_name = "logical_batch_size"

    def decide(self, obs: Observation) -> bool:
        return obs.samples >= obs.threshold


class GNS(Controller):
    """Gradient-noise-scale controller (torch-gqc's ``OptimizerWrapperGNS`` statistic and decisions).

    ``noise = var(n) / (mean(n^2) + 1e-8)`` over the per-microbatch gradient norms ``n`` of the window
    (all ranks); step iff ``noise <= k * tolerance``. The statistic exists only from two norms on: one
    process never steps on a window's first draw (torch-gqc: the variance of one value is NaN, and NaN
    never passes), so windows hold >= 2 microbatches unless the cap is 1. An earlier version reused the
    previous window's statistic there; a window then stepped on its first draw, never measured the noise
    again and stepped every microbatch for the rest of the run. To decide on a first draw use
    :class:`GNSSample` (per-sample norms).
    """

    name = "gns"
    threshold_name = "noise_tolerance"
    needs_microbatch_norms = True

    def __init__(self) -> None:
        self.history: list[float] = []
        self.last_noise: float | None = None  # the last statistic computed (for logs), never reused

    def noise(self) -> float | None:
        """The window's statistic, ``None`` with fewer than two norms."""
        if len(self.history) < 2:
            return None
        n = len(self.history)
        mean = sum(self.history) / n
        var = sum((x - mean) ** 2 for x in self.history) / (n - 1)  # unbiased, as torch.var
        mean_sq = sum(x * x for x in self.history) / n
        return var / (mean_sq + 1e-8)

    def decide(self, obs: Observation) -> bool:
        self.history.extend(float(x) for x in obs.microbatch_norms)
        noise = self.noise()
        if noise is None or not math.isfinite(noise):
            return False
        self.last_noise = noise
        return noise <= obs.k * obs.threshold

    def end_window(self, stepped: bool) -> None:
        self.history = []

    def state_dict(self) -> dict[str, Any]:
        return {"last_noise": self.last_noise}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_noise = state.get("last_noise")


class GNSSample(Controller):
    """Gradient noise scale from per-sample gradient norms: can decide on a window's first draw.

    Each draw adds the microbatch's per-sample squared norms to the window's
    :class:`~hf_gradext.gqc.noise.SampleNormStats`; with the window's mean-gradient norm they give
    unbiased ``tr(Sigma)`` and ``|G|^2`` (:func:`~hf_gradext.gqc.noise.estimate_noise`). Step iff the
    noise-to-signal ratio of the window's mean gradient is within the tolerance:

        W2 tr(Sigma) <= tolerance |G|^2,   i.e.   N_eff >= B_simple / tolerance

    (torch-gqc's ``gns`` reading of the tolerance, ``noise / k <= tolerance``, with the noise measured
    instead of approximated by the spread of microbatch norms). A non-positive ``|G|^2`` estimate (noise
    dominates) keeps drawing; a window of one sample cannot be estimated and keeps drawing.

    Args:
        ema: weight of the current window in ``tr(Sigma)`` and ``|G|^2`` (McCandlish et al. smooth both
            before dividing). 1.0 (default): the window alone; below 1 the decision blends in an EMA over
            the previous windows' final estimates, which steadies small-window decisions.
        sample_norm_every: measure per-sample norms on every N-th microbatch of the run only
            (:meth:`measures`); an unmeasured draw brings its exact count and weights, and its
            ``sum |g_i|^2`` is imputed as ``count x`` the last measured microbatch's ``mean |g_i|^2``
            (:mod:`hf_gradext.gqc.noise`, module docstring). 1 (default): every microbatch, no imputation.
    """

    name = "gns_sample"
    threshold_name = "noise_tolerance"
    needs_sample_norms = True

    def __init__(self, ema: float = 1.0, sample_norm_every: int = 1) -> None:
        if not 0 < ema <= 1:
            raise ValueError(f"ema must be in (0, 1], got {ema}")
        if (
            isinstance(sample_norm_every, bool)
            or not isinstance(sample_norm_every, int)
            or sample_norm_every < 1
        ):
            raise ValueError(f"sample_norm_every must be an integer >= 1, got {sample_norm_every!r}")
        self.ema = ema
        self.sample_norm_every = sample_norm_every
        # mean |g_i|^2 of the last measured microbatch (over all ranks): what an unmeasured draw imputes.
        # Checkpointed, so a resumed run imputes (and measures, see measures()) exactly as an uninterrupted one.
        self.last_mean_sq: float | None = None
        self.window = SampleNormStats()
        self.trace_ema: float | None = None
        self.signal_ema: float | None = None
        self.last: NoiseEstimate | None = None  # the estimate behind the last decision (for logs)
        self._window_estimate: NoiseEstimate | None = None

    def measures(self, microbatch_index: int) -> bool:
        """Whether the run's microbatch number ``microbatch_index`` (0-based, all epochs) needs its norms.

        Every ``sample_norm_every``-th one, and any one while there is nothing to impute from (the run's
        first, or a checkpoint written without a measured value). The index and this state are the same
        on every rank, so all ranks measure on the same microbatches.
        """
        return self.last_mean_sq is None or microbatch_index % self.sample_norm_every == 0

    def decide(self, obs: Observation) -> bool:
        if obs.sample_stats is not None and not obs.sample_norms_measured:
            if self.last_mean_sq is None:
                raise RuntimeError(
                    "gns_sample: an unmeasured microbatch arrived before any measured one (see measures())"
                )
            stats = dataclasses.replace(obs.sample_stats, sq_sum=self.last_mean_sq * obs.sample_stats.count)
        elif obs.sample_stats is not None:
            stats = obs.sample_stats
        elif obs.sample_sq_norms is not None:
            stats = sample_norm_stats(obs.sample_sq_norms, obs.sample_weights)
        else:
            raise UserFacingError(
                "gqc gns_sample needs per-sample squared gradient norms for every microbatch: pass "
                "sample_sq_norms=(B,) tensor (e.g. from hf_gradext.grad.per_sample_grad_norms) or sample_stats"
            )
        if obs.sample_norms_measured and stats.count > 0:
            self.last_mean_sq = stats.mean_sq
        self.window = self.window + stats
        # |G_w|^2 over the same parameters as the per-sample norms (a layer subset: its own norm)
        mean_norm = obs.mean_grad_norm if obs.sample_mean_grad_norm is None else obs.sample_mean_grad_norm
        est = estimate_noise(self.window, mean_norm**2)
        self._window_estimate = est
        if est is None:
            return False
        if self.ema < 1 and self.trace_ema is not None and self.signal_ema is not None:
            est = NoiseEstimate(
                trace_sigma=(1 - self.ema) * self.trace_ema + self.ema * est.trace_sigma,
                signal_sq=(1 - self.ema) * self.signal_ema + self.ema * est.signal_sq,
                n_eff=est.n_eff,
            )
        self.last = est
        return est.signal_sq > 0 and est.trace_sigma / est.n_eff <= obs.threshold * est.signal_sq

    def end_window(self, stepped: bool) -> None:
        est = self._window_estimate
        if stepped and est is not None:  # a skipped (non-finite) window teaches nothing
            first = self.trace_ema is None or self.signal_ema is None
            self.trace_ema = (
                est.trace_sigma if first else (1 - self.ema) * self.trace_ema + self.ema * est.trace_sigma
            )
            self.signal_ema = (
                est.signal_sq if first else (1 - self.ema) * self.signal_ema + self.ema * est.signal_sq
            )
        self.window = SampleNormStats()
        self._window_estimate = None

    def state_dict(self) -> dict[str, Any]:
        return {"trace_ema": self.trace_ema, "signal_ema": self.signal_ema, "last_mean_sq": self.last_mean_sq}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trace_ema = state.get("trace_ema")
        self.signal_ema = state.get("signal_ema")
        self.last_mean_sq = state.get("last_mean_sq")  # absent in older checkpoints: measures() re-measures


class Seesaw(Controller):
    """Seesaw batch ramp (:mod:`hf_gradext.gqc.lr_coupling`): the window doubles where the LR would halve.

    The window size is fixed when a window starts, from the LR scheduler's factor there
    (``Observation.lr_factor``): ``k0 * 2^j`` microbatches, ``j`` the growths so far. The loop also takes
    the step's LR multiplier from :attr:`plan` (LR times ``1/sqrt(2)`` per growth instead of the decay).
    The scheduled value (``threshold``) is not read: ``k0`` is fixed at construction.
    """

    name = "seesaw"
    threshold_name = "microbatches_per_step"
    needs_lr_factor = True

    def __init__(self, k0: int = 1, cap: int = 64) -> None:
        self.plan = SeesawPlan(k0, cap)
        self.target = k0

    def effective_threshold(self, obs: Observation) -> float:
        return float(self.target)

    def decide(self, obs: Observation) -> bool:
        if obs.k == 1:
            if obs.lr_factor is None:
                raise UserFacingError(
                    "gqc seesaw needs the LR scheduler's factor at each window start (a torch LR scheduler "
                    "with initial_lr in its param groups); use a non-metric --lr_scheduler_type"
                )
            self.target = self.plan.start_window(obs.lr_factor)
        return obs.k >= self.target

    def state_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.state_dict(), "target": self.target}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plan.load_state_dict(state.get("plan", {}))
        self.target = int(state.get("target", self.target))


class MHT(Controller):
    """Metric Hypothesis Test (torch-gqc's ``OptimizerWrapperMHT``) on the microbatch losses.

    Step iff the ``confidence`` t-interval of the set ``[running_mean] + window losses`` lies within
    ``mean * (1 +- threshold)``, where ``mean`` is that set's mean and ``running_mean`` an EMA of
    all microbatch losses.
    Non-finite losses are never added to the history (the caller skips such windows).
    """

    name = "mht"
    threshold_name = "percent_error_threshold"
    needs_metrics = True

    def __init__(self, confidence: float = 0.95, beta: float = 0.01) -> None:
        self.confidence = confidence
        self.beta = beta
        self.running_mean: float | None = None
        self.history: list[float] = []

    def decide(self, obs: Observation) -> bool:
        metrics = [float(x) for x in obs.metrics]
        if not metrics or not all(math.isfinite(x) for x in metrics):
            return False
        self.history.extend(metrics)
        update = sum(metrics) / len(metrics)
        if self.running_mean is None:
            self.running_mean = update
        else:
            self.running_mean = self.running_mean * (1 - self.beta) + update * self.beta
        values = [self.running_mean, *self.history]
        n = len(values)
        mean = sum(values) / n
        sem = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1) / n)
        half = _t_quantile(0.5 + self.confidence / 2, n - 1) * (sem + 1e-12)
        return (mean - half) >= mean * (1 - obs.threshold) and (mean + half) <= mean * (1 + obs.threshold)

    def end_window(self, stepped: bool) -> None:
        self.history = []

    def state_dict(self) -> dict[str, Any]:
        return {"running_mean": self.running_mean}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.running_mean = state.get("running_mean")


def _t_quantile(p: float, df: int) -> float:
    """Student-t quantile (scipy is a torch-gqc dependency, imported lazily so others never need it)."""
    try:
        from scipy import stats
    except ImportError as exc:  # pragma: no cover - exercised only without scipy
        raise UserFacingError("--gqc mht needs scipy for its t-interval; `pip install scipy`") from exc
    return float(stats.t.ppf(p, df))


def build_controller(args) -> Controller:
    """The controller named by ``args.gqc`` configured from ``GQCArguments`` fields."""
    if args.gqc == "gnts":
        return GNTS(mode=args.gqc_threshold_mode, ema=args.gqc_relative_ema)
    if args.gqc == "sbc":
        return SBC()
    if args.gqc == "gns":
        return GNS()
    if args.gqc == "gns_sample":
        return GNSSample(
            ema=getattr(args, "gqc_gns_ema", 1.0), sample_norm_every=getattr(args, "gqc_sample_norm_every", 1)
        )
    if args.gqc == "seesaw":
        return Seesaw(k0=int(args.gqc_threshold_start), cap=args.gqc_max_microbatches)
    if args.gqc == "mht":
        return MHT(confidence=args.gqc_mht_confidence, beta=args.gqc_mht_beta)
    raise ValueError(f"no controller for gqc={args.gqc!r}")
