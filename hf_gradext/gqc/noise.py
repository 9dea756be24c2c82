"""Gradient noise scale from per-sample gradient norms (McCandlish et al. 2018, "simple" noise scale).

Model: the per-sample gradients ``g_i`` of a window are i.i.d. with mean ``G`` (the true gradient) and
covariance ``Sigma``; the window's mean gradient is ``G_w = sum_i w_i g_i`` with weights ``w_i >= 0``
summing to 1 (equal weights ``1/N``, or token weights ``n_i / sum n`` for HF's token-mean loss). Then

    E |G_w|^2            = |G|^2 + W2 tr(Sigma),   W2 = sum_i w_i^2   (= 1/N for equal weights)
    E mean_i |g_i|^2     = |G|^2 + tr(Sigma)

so with ``S = mean_i |g_i|^2`` (from the per-sample squared norms) and ``M = |G_w|^2`` (the tested norm,
squared) the two unbiased estimates are

    tr(Sigma) ~ (S - M) / (1 - W2)          |G|^2 ~ (M - W2 S) / (1 - W2)

(for ``W2 = 1/N``: ``N/(N-1) (S - M)``, the trace of the unbiased sample covariance, and
``(N M - S)/(N - 1)``). ``B_simple = tr(Sigma) / |G|^2`` is the batch size at which the noise of a mean
gradient equals its signal; the noise-to-signal ratio of the window's mean gradient is
``W2 tr(Sigma) / |G|^2 = B_simple / N_eff`` with ``N_eff = 1 / W2``.

Both estimates need only four additive numbers per microbatch (:class:`SampleNormStats`), so a window
and the ranks of a DDP run combine by summing them: one small all-reduce, no per-sample tensor moves.
The ratio of two unbiased estimates is not unbiased; at a handful of samples it is noisy (see the
``ema`` option of :class:`hf_gradext.gqc.controllers.GNSSample`).

Measuring every N-th microbatch (``--gqc_sample_norm_every N``): of the four numbers only ``sq_sum``
needs the per-sample norms; ``count`` and the weights come from the labels of every microbatch
(:func:`weight_vector`). On a microbatch whose norms were not measured, ``sq_sum`` is imputed as
``count x S_last``, ``S_last`` the ``mean_sq`` of the most recent measured microbatch (over all ranks).
``S`` estimates ``E |g_i|^2 = |G|^2 + tr(Sigma)``, a per-sample expectation that drifts only as the model
trains, so the imputed window ``S`` stays unbiased up to that drift over N microbatches; ``W2`` and ``M``
remain the window's own. What is lost is the correlation of ``S`` and ``M`` on the same samples (which
partly cancels their noise): the estimate is noisier, not shifted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SampleNormStats:
    """Additive statistics of per-sample squared gradient norms (sum them over microbatches and ranks).

    Attributes:
        count: samples.
        sq_sum: ``sum_i |g_i|^2``.
        weight_sum: ``sum_i w_i`` of the samples' raw (unnormalized) weights in the window's mean gradient.
        weight_sq_sum: ``sum_i w_i^2``.
    """

    count: float = 0.0
    sq_sum: float = 0.0
    weight_sum: float = 0.0
    weight_sq_sum: float = 0.0

    def __add__(self, other: SampleNormStats) -> SampleNormStats:
        return SampleNormStats(
            self.count + other.count,
            self.sq_sum + other.sq_sum,
            self.weight_sum + other.weight_sum,
            self.weight_sq_sum + other.weight_sq_sum,
        )

    @classmethod
    def from_vector(cls, values: Sequence[float]) -> SampleNormStats:
        """From the 4 numbers of :func:`sample_norm_vector` (after summing them over ranks)."""
        if len(values) != 4:
            raise ValueError(
                f"expected 4 numbers [count, sq_sum, weight_sum, weight_sq_sum], got {len(values)}"
            )
        return cls(*(float(v) for v in values))

    @property
    def mean_sq(self) -> float:
        """``S = mean_i |g_i|^2``."""
        return self.sq_sum / self.count if self.count > 0 else math.nan

    @property
    def weight_concentration(self) -> float:
        """``W2 = sum w_i^2 / (sum w_i)^2``: ``1 / N_eff`` of the weighted mean."""
        return self.weight_sq_sum / self.weight_sum**2 if self.weight_sum > 0 else math.nan


def sample_norm_vector(sq_norms: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``[count, sum sq, sum w, sum w^2]`` as a float64 (4,) tensor on ``sq_norms``' device (no host read).

    Args:
        sq_norms: (B,) per-sample squared gradient norms ``|g_i|^2``.
        weights: (B,) raw weights of the samples in the window's mean gradient (e.g. label-token counts
            under a token-mean loss); ``None``: equal weights (1 each). Samples of weight 0 are not counted.
    """
    if sq_norms.dim() != 1:
        raise ValueError(f"per-sample squared norms must be a (B,) tensor, got shape {tuple(sq_norms.shape)}")
    sq = sq_norms.detach().to(torch.float64)  # (B,); float64: S - M cancels when the noise is small
    if weights is None:
        n = float(sq.shape[0])
        return torch.stack([sq.new_tensor(n), sq.sum(), sq.new_tensor(n), sq.new_tensor(n)])
    w = weights.detach().to(device=sq.device, dtype=torch.float64)  # (B,)
    if w.shape != sq.shape:
        raise ValueError(f"sample weights {tuple(w.shape)} do not match the squared norms {tuple(sq.shape)}")
    # A zero-weight sample (no label token: its gradient is exactly 0) is no draw from the gradient
    # distribution; counting it would pull S = mean |g_i|^2 toward 0. Counted on the device (no host read).
    count = w.gt(0).sum().to(torch.float64)
    return torch.stack([count, sq.sum(), w.sum(), w.pow(2).sum()])


def weight_vector(weights: torch.Tensor | None, batch_size: int, device: torch.device | str) -> torch.Tensor:
    """:func:`sample_norm_vector` of a microbatch whose per-sample norms were not measured: ``sq_sum = 0``.

    ``count`` and the weights are exact (they need only the labels); the consumer imputes ``sq_sum``
    (:class:`hf_gradext.gqc.controllers.GNSSample`, module docstring). Float64 (4,) on ``device``.

    Args:
        weights: (B,) raw weights, as for :func:`sample_norm_vector`; ``None``: equal weights.
        batch_size: B (used when ``weights`` is None).
        device: where the vector goes (the loop's reduction device).
    """
    if weights is None:
        n = float(batch_size)
        return torch.tensor([n, 0.0, n, n], dtype=torch.float64, device=device)
    w = weights.detach().to(device=device, dtype=torch.float64)  # (B,)
    count = w.gt(0).sum().to(torch.float64)  # zero-weight samples are no draw, as in sample_norm_vector
    return torch.stack([count, w.new_zeros(()), w.sum(), w.pow(2).sum()])


def sample_norm_stats(sq_norms: torch.Tensor, weights: torch.Tensor | None = None) -> SampleNormStats:
    """:func:`sample_norm_vector` read on the host (one device sync)."""
    return SampleNormStats.from_vector(sample_norm_vector(sq_norms, weights).tolist())


@dataclass(frozen=True)
class NoiseEstimate:
    """Unbiased ``tr(Sigma)`` and ``|G|^2`` of a window, and the window's effective sample count."""

    trace_sigma: float
    signal_sq: float
    n_eff: float

    @property
    def b_simple(self) -> float:
        """``tr(Sigma) / |G|^2`` (inf when the signal estimate is not positive: noise dominates)."""
        return self.trace_sigma / self.signal_sq if self.signal_sq > 0 else math.inf

    @property
    def noise_ratio(self) -> float:
        """Noise-to-signal ratio of the window's mean gradient, ``B_simple / N_eff``."""
        return self.b_simple / self.n_eff


def estimate_noise(stats: SampleNormStats, mean_grad_sq_norm: float) -> NoiseEstimate | None:
    """The estimates of the module docstring; ``None`` when the window cannot separate noise from signal.

    Args:
        stats: the window's per-sample statistics (all microbatches and ranks so far).
        mean_grad_sq_norm: ``|G_w|^2``, squared norm of the window's (weighted) mean gradient, over the
            same parameters as the per-sample norms.
    """
    w2 = stats.weight_concentration
    s, m = stats.mean_sq, float(mean_grad_sq_norm)
    # One sample (or all weight on one sample) gives W2 = 1: S and M coincide, nothing to separate.
    if stats.count < 2 or not (0.0 < w2 < 1.0) or not (math.isfinite(s) and math.isfinite(m)):
        return None
    return NoiseEstimate(
        trace_sigma=(s - m) / (1.0 - w2), signal_sq=(m - w2 * s) / (1.0 - w2), n_eff=1.0 / w2
    )
