"""Per-sample gradient noise scale (``gns_sample``) against float64 closed forms.

Oracle: synthetic per-sample gradients ``g_i = G + L z_i`` with a known mean ``G`` and covariance
``Sigma = L L^T``; the estimators must equal the sample-covariance identities exactly and be unbiased
over many windows.
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_gradext.errors import UserFacingError
from hf_gradext.gqc.controllers import GNSSample, Observation
from hf_gradext.gqc.core import GQCCore
from hf_gradext.gqc.noise import SampleNormStats, estimate_noise, sample_norm_stats, sample_norm_vector
from hf_gradext.gqc.wrapper import GQCOptimizer

D = 5


def _truth(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(D, generator=g, dtype=torch.float64)  # (D,)
    chol = torch.randn(D, D, generator=g, dtype=torch.float64) * 0.8  # (D, D)
    return mean, chol, g


def _draw(mean, chol, g, *shape):
    z = torch.randn(*shape, D, generator=g, dtype=torch.float64)  # (..., D)
    return mean + z @ chol.T  # (..., D)


def test_estimates_equal_the_sample_covariance_identities():
    mean, chol, g = _truth()
    grads = _draw(mean, chol, g, 7)  # (N, D) per-sample gradients
    gbar = grads.mean(0)  # (D,)
    est = estimate_noise(sample_norm_stats(grads.pow(2).sum(1)), float(gbar.pow(2).sum()))
    trace = float(((grads - gbar) ** 2).sum() / (len(grads) - 1))  # tr of the unbiased sample covariance
    assert est.trace_sigma == pytest.approx(trace, rel=1e-12)
    assert est.signal_sq == pytest.approx(float(gbar.pow(2).sum()) - trace / len(grads), rel=1e-12)
    assert est.n_eff == pytest.approx(7.0)
    assert est.b_simple == pytest.approx(est.trace_sigma / est.signal_sq)


@pytest.mark.parametrize("weighted", [False, True])
def test_estimates_are_unbiased_over_windows(weighted):
    mean, chol, g = _truth(1)
    reps, n = 20000, 4
    grads = _draw(mean, chol, g, reps, n)  # (R, N, D)
    w = (
        torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
        if weighted
        else torch.ones(n, dtype=torch.float64)
    )
    gw = (grads * (w / w.sum())[None, :, None]).sum(1)  # (R, D) weighted window mean
    sq = grads.pow(2).sum(2)  # (R, N)
    traces, signals = [], []
    for r in range(reps):
        est = estimate_noise(
            SampleNormStats.from_vector(sample_norm_vector(sq[r], w).tolist()), float(gw[r] @ gw[r])
        )
        traces.append(est.trace_sigma)
        signals.append(est.signal_sq)
    true_trace, true_signal = float((chol @ chol.T).trace()), float(mean @ mean)
    t, s = torch.tensor(traces), torch.tensor(signals)
    # within 4 standard errors of the closed-form expectation
    assert abs(float(t.mean()) - true_trace) < 4 * float(t.std()) / math.sqrt(reps)
    assert abs(float(s.mean()) - true_signal) < 4 * float(s.std()) / math.sqrt(reps)


def test_stats_add_over_microbatches_and_ranks():
    mean, chol, g = _truth(2)
    grads = _draw(mean, chol, g, 12)
    sq = grads.pow(2).sum(1)
    w = torch.rand(12, generator=g, dtype=torch.float64) + 0.5
    parts = [sample_norm_stats(sq[i : i + 4], w[i : i + 4]) for i in (0, 4, 8)]
    whole = sample_norm_stats(sq, w)
    summed = parts[0] + parts[1] + parts[2]
    for a, b in zip(
        (summed.count, summed.sq_sum, summed.weight_sum, summed.weight_sq_sum),
        (whole.count, whole.sq_sum, whole.weight_sum, whole.weight_sq_sum),
        strict=True,
    ):
        assert a == pytest.approx(b, rel=1e-12)
    assert whole.weight_concentration == pytest.approx(float((w**2).sum() / w.sum() ** 2))


def _oracle_decision(window: torch.Tensor, tol: float) -> bool:
    """Step iff tr(Sigma)/N <= tol |G|^2 from the window's explicit per-sample gradients (N, D)."""
    n = len(window)
    gbar = window.mean(0)
    trace = float(((window - gbar) ** 2).sum() / (n - 1))
    signal = float(gbar @ gbar) - trace / n
    return signal > 0 and trace / n <= tol * signal


def test_controller_decides_from_the_first_draw_like_the_closed_form():
    mean, chol, g = _truth(3)
    tol, cap, b = 0.5, 6, 4
    core = GQCCore(GNSSample(), max_microbatches=cap, threshold=tol)
    window: list[torch.Tensor] = []
    first_draw_steps = 0
    for i in range(200):
        scale = 0.3 + 2.5 * (i % 20) / 20  # noise varies, so some windows need several draws
        mb = mean + (_draw(mean, chol, g, b) - mean) * scale  # (B, D)
        window.append(mb)
        full = torch.cat(window)  # (N, D)
        core.add_microbatch(samples=b)
        d = core.decide(float(full.mean(0).norm()), sample_sq_norms=mb.pow(2).sum(1))
        expected = _oracle_decision(full, tol) or len(window) >= cap
        assert d.step == expected, i
        first_draw_steps += d.step and d.k == 1
        if d.step:
            window = []
    assert first_draw_steps > 10  # decides on first draws, unlike gns
    assert 0 < core.totals["capped_steps"] < core.totals["steps"]


def test_one_sample_windows_cannot_be_estimated_and_noise_dominated_ones_keep_drawing():
    ctrl = GNSSample()
    one = Observation(k=1, mean_grad_norm=1.0, threshold=1.0, sample_sq_norms=torch.tensor([1.0]))
    assert not ctrl.decide(one) and ctrl.last is None
    ctrl.end_window(True)
    # |G_B|^2 below mean |g_i|^2 / N: the signal estimate is negative, B_simple infinite
    obs = Observation(k=1, mean_grad_norm=0.1, threshold=1e9, sample_sq_norms=torch.tensor([1.0, 1.0]))
    assert not ctrl.decide(obs) and ctrl.last.b_simple == math.inf


def test_missing_per_sample_norms_is_a_clear_error():
    core = GQCCore(GNSSample(), threshold=1.0)
    core.add_microbatch()
    with pytest.raises(UserFacingError, match="per-sample squared gradient norms"):
        core.decide(1.0)


def test_ema_blends_previous_windows_and_survives_state_roundtrip():
    mean, chol, g = _truth(4)
    ctrl = GNSSample(ema=0.25)
    core = GQCCore(ctrl, max_microbatches=1, threshold=0.1)
    finals = []
    for _ in range(3):
        mb = _draw(mean, chol, g, 6)
        core.add_microbatch()
        core.decide(float(mb.mean(0).norm()), sample_sq_norms=mb.pow(2).sum(1))
        finals.append(estimate_noise(sample_norm_stats(mb.pow(2).sum(1)), float(mb.mean(0).pow(2).sum())))
    trace = finals[0].trace_sigma
    for est in finals[1:]:
        trace = 0.75 * trace + 0.25 * est.trace_sigma
    assert ctrl.trace_ema == pytest.approx(trace, rel=1e-12)
    other = GQCCore(GNSSample(ema=0.25), max_microbatches=1, threshold=0.1)
    other.load_state_dict(core.state_dict())
    assert other.controller.trace_ema == ctrl.trace_ema and other.controller.signal_ema == ctrl.signal_ema


def _assert_estimate_of(opt, per_sample):
    """The wrapper's tr(Sigma) and |G|^2 equal the closed forms of the explicit (N, P) per-sample gradients."""
    gbar = per_sample.mean(0)  # (P,)
    trace = float(((per_sample - gbar) ** 2).sum() / (len(per_sample) - 1))
    stats = opt.statistics()
    assert stats["trace_sigma"] == pytest.approx(trace, rel=1e-6)
    assert stats["signal_sq"] == pytest.approx(float(gbar @ gbar) - trace / len(per_sample), rel=1e-6)


def test_wrapper_with_per_sample_norms_of_a_real_model_matches_explicit_per_sample_gradients():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    params = list(model.parameters())
    opt = GQCOptimizer(torch.optim.SGD(params, lr=0.0), "gns_sample", threshold=1e-9, max_microbatches=3)
    window = []
    for _ in range(3):
        x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
        per_sample = []
        for i in range(5):  # explicit per-sample gradients (the oracle)
            gi = torch.autograd.grad(torch.nn.functional.mse_loss(model(x[i : i + 1]), y[i : i + 1]), params)
            per_sample.append(torch.cat([t.flatten() for t in gi]))
        per_sample = torch.stack(per_sample)  # (B, P)
        window.append(per_sample)
        torch.nn.functional.mse_loss(model(x), y).backward()  # microbatch mean loss
        opt.step(sample_sq_norms=per_sample.pow(2).sum(1))
        _assert_estimate_of(opt, torch.cat(window))
    assert opt.last_decision.reason == "cap"


def test_wrapper_with_norms_of_a_parameter_subset_takes_the_window_norm_over_that_subset():
    # Two layers, per-sample norms of the second only: the estimate must use |G_w|^2 of the second layer too.
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    params, subset = list(model.parameters()), list(model[2].parameters())
    opt = GQCOptimizer(
        torch.optim.SGD(params, lr=0.0),
        "gns_sample",
        threshold=1e-9,
        max_microbatches=3,
        sample_norm_params=subset,
    )
    window = []
    for _ in range(3):
        x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
        rows = []
        for i in range(5):  # explicit per-sample gradients of the subset (the oracle)
            gi = torch.autograd.grad(torch.nn.functional.mse_loss(model(x[i : i + 1]), y[i : i + 1]), subset)
            rows.append(torch.cat([t.flatten() for t in gi]))
        window.append(torch.stack(rows))  # (B, P_subset)
        torch.nn.functional.mse_loss(model(x), y).backward()  # microbatch mean loss, every parameter
        opt.step(sample_sq_norms=window[-1].pow(2).sum(1))
        _assert_estimate_of(opt, torch.cat(window))


def test_wrapper_refuses_a_bad_sample_norm_subset():
    model = torch.nn.Linear(3, 1)
    other = torch.nn.Linear(3, 1)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UserFacingError, match="subset of the wrapped optimizer"):
        GQCOptimizer(sgd, "gns_sample", sample_norm_params=list(other.parameters()))
    with pytest.raises(UserFacingError, match="subset of the wrapped optimizer"):
        GQCOptimizer(sgd, "gns_sample", sample_norm_params=[])
    with pytest.raises(UserFacingError, match="gns_sample controller only"):
        GQCOptimizer(sgd, "gnts", sample_norm_params=[model.weight])
    assert (
        GQCOptimizer(sgd, "gns_sample", sample_norm_params=model.parameters())._subset is None
    )  # all of them
