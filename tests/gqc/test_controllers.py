"""Controllers + custom-loop wrapper against torch-gqc (the reference) and closed-form oracles."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from hf_gradext.gqc.controllers import GNS, GNTS, MHT, SBC, Observation
from hf_gradext.gqc.core import GQCCore
from hf_gradext.gqc.wrapper import GQCOptimizer

gqc_ref = pytest.importorskip("gradient_quality_control")


def _stream(n: int, seed: int = 0):
    """A stream of (x, y) microbatches whose gradient noise varies (some draws need averaging)."""
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        x = torch.randn(8, 6, generator=g) * (1 + (i % 5))
        yield x, x.sum(1, keepdim=True) + torch.randn(8, 1, generator=g)


def _pair():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1)
    return model, copy.deepcopy(model)


def test_gnts_decisions_identical_to_torch_gqc_including_threshold_change_mid_run():
    mine_model, ref_model = _pair()
    ref = gqc_ref.OptimizerWrapperGNTS(torch.optim.SGD(ref_model.parameters(), lr=0.05), max_batch_draws=6)
    mine = GQCOptimizer(
        torch.optim.SGD(mine_model.parameters(), lr=0.05), "gnts", threshold=4.0, max_microbatches=6
    )
    for g in ref.optimizer.param_groups:
        g["gradient_norm_threshold"] = 4.0
    ref_decisions, my_decisions = [], []
    for i, (x, y) in enumerate(_stream(120)):
        if i == 60:  # threshold changed mid-run, on both
            for g in ref.optimizer.param_groups:
                g["gradient_norm_threshold"] = 1.5
            mine.set_threshold(1.5)
        for model in (ref_model, mine_model):
            torch.nn.functional.mse_loss(model(x), y).backward()
        ref_decisions.append(ref.step())
        my_decisions.append(mine.step())
    assert my_decisions == ref_decisions
    assert 5 < sum(my_decisions) < 115  # the stream exercises both outcomes
    assert sum(my_decisions[:60]) > sum(my_decisions[60:])  # tighter threshold -> fewer steps
    for a, b in zip(mine_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b)


def test_averaging_k_draws_of_a_constant_gradient_steps_with_that_gradient():
    w = torch.nn.Parameter(torch.zeros(5))
    g = torch.tensor([3.0, -1.0, 0.5, 2.0, 0.0])
    opt = GQCOptimizer(torch.optim.SGD([w], lr=1.0), "gnts", threshold=0.0, max_microbatches=7)
    for k in range(1, 8):
        (w * g).sum().backward()  # d/dw = g every draw
        stepped = opt.step()
        assert stepped == (k == 7)
        if not stepped:  # the tested norm is the mean's norm: ||k g|| / k = ||g||
            assert opt.last_decision.mean_grad_norm == pytest.approx(float(g.norm()), rel=1e-6)
    torch.testing.assert_close(w.detach(), -g)  # one SGD step with the mean gradient g, not k g
    assert opt.last_decision.reason == "cap"
    assert w.grad is None  # zeroed after the step


def test_items_mode_divides_by_window_items():
    w = torch.nn.Parameter(torch.zeros(2))
    opt = GQCOptimizer(torch.optim.SGD([w], lr=1.0), "gnts", threshold=0.0, max_microbatches=2)
    (w * torch.tensor([3.0, 0.0])).sum().backward()  # token-sum loss over 3 items
    opt.step(num_items=3)
    (w * torch.tensor([0.0, 1.0])).sum().backward()  # 1 item
    assert opt.step(num_items=1)
    torch.testing.assert_close(w.detach(), -torch.tensor([3.0, 1.0]) / 4)


def test_cap_forces_a_step_every_max_microbatches():
    core = GQCCore(GNTS(), max_microbatches=3, threshold=0.0)
    steps = []
    for _ in range(9):
        core.add_microbatch()
        steps.append(core.decide(1.0).step)
    assert steps == [False, False, True] * 3
    assert core.totals["capped_steps"] == 3


def test_nan_microbatch_skips_window_and_never_reaches_optimizer():
    w = torch.nn.Parameter(torch.ones(3))
    opt = GQCOptimizer(torch.optim.SGD([w], lr=0.1), "gnts", threshold=0.0, max_microbatches=3)
    (w * 2).sum().backward()
    assert not opt.step()
    (w * float("nan")).sum().backward()
    assert not opt.step()
    assert opt.last_decision.skip and opt.last_decision.reason == "nonfinite"
    torch.testing.assert_close(w.detach(), torch.ones(3))  # untouched
    assert w.grad is None
    for _ in range(3):  # the next window starts clean
        (w * 2).sum().backward()
        opt.step()
    torch.testing.assert_close(w.detach(), torch.ones(3) - 0.2)
    assert opt.core.totals["skipped_windows"] == 1 and opt.core.totals["skipped_microbatches"] == 2


def test_sbc_steps_at_logical_batch_size():
    core = GQCCore(SBC(), max_microbatches=64, threshold=10)
    out = []
    for _ in range(6):
        core.add_microbatch(samples=4)
        out.append(core.decide(1.0).step)
    assert out == [False, False, True, False, False, True]


def _rising_noise_stream(n: int, seed: int = 0):
    """Linear-regression microbatches whose label noise grows along the stream (gns must draw more)."""
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(6, 1, generator=g)
    for i in range(n):
        x = torch.randn(8, 6, generator=g)
        yield x, x @ w_true + 0.05 * (1.0 + i) ** 1.5 * torch.randn(8, 1, generator=g)


def test_gns_keeps_measuring_noise_and_matches_torch_gqc_when_noise_rises():
    # Regression: the statistic only exists from two norms on; reusing the previous window's value let
    # every window after the first step on its first draw, forever (30 steps in 40 draws here, vs 10).
    mine_model, ref_model = _pair()
    ref = gqc_ref.OptimizerWrapperGNS(torch.optim.SGD(ref_model.parameters(), lr=0.05), max_batch_draws=16)
    for g in ref.optimizer.param_groups:
        g["noise_tolerance"] = 0.02
    mine = GQCOptimizer(
        torch.optim.SGD(mine_model.parameters(), lr=0.05), "gns", threshold=0.02, max_microbatches=16
    )
    ref_out, my_out, windows = [], [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch-gqc's torch.var of one value warns (and gives NaN)
        for x, y in _rising_noise_stream(40):
            for model in (ref_model, mine_model):
                torch.nn.functional.mse_loss(model(x), y).backward()
            ref_out.append(ref.step())
            my_out.append(mine.step())
            if my_out[-1]:
                windows.append(mine.last_decision.k)
    assert my_out == ref_out
    assert sum(my_out) == 10
    assert min(windows) >= 2  # one process never steps on a window's first draw
    for a, b in zip(mine_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b)


def test_gns_statistic_is_the_windows_own_and_needs_two_norms():
    gns = GNS()
    assert not gns.decide(Observation(k=1, mean_grad_norm=1, threshold=10.0, microbatch_norms=[1.0]))
    assert gns.decide(Observation(k=2, mean_grad_norm=1, threshold=10.0, microbatch_norms=[1.1]))
    history = [1.0, 1.1]
    expected = torch.tensor(history).var() / (torch.tensor(history).pow(2).mean() + 1e-8)
    assert gns.last_noise == pytest.approx(float(expected), rel=1e-6)
    gns.end_window(True)
    # the next window's first draw has one norm again: no statistic, no step (the old one is not reused)
    assert not gns.decide(Observation(k=1, mean_grad_norm=1, threshold=10.0, microbatch_norms=[5.0]))
    # two ranks give two norms per draw: a first-draw decision exists (torch-gqc's all_gather)
    gns.end_window(True)
    assert gns.decide(Observation(k=1, mean_grad_norm=1, threshold=10.0, microbatch_norms=[1.0, 1.05]))


def test_mht_decisions_identical_to_torch_gqc():
    from gradient_quality_control.implementations.metric_hypothesis_test import OptimizerWrapperMHT

    model = torch.nn.Linear(2, 1)
    ref = OptimizerWrapperMHT(
        torch.optim.SGD(model.parameters(), lr=0.0), max_batch_draws=64, update_beta=0.05
    )
    for g in ref.optimizer.param_groups:
        g["confidence_level"], g["percent_error_threshold"] = 0.9, 0.05
    core = GQCCore(MHT(confidence=0.9, beta=0.05), max_microbatches=64, threshold=0.05)
    gen = torch.Generator().manual_seed(3)
    mine_out, ref_out = [], []
    for i in range(200):
        metric = 3.0 - i * 0.005 + float(torch.randn((), generator=gen)) * 0.1
        model(torch.ones(1, 2)).sum().backward()
        ref_out.append(ref.step(metric))
        core.add_microbatch()
        mine_out.append(core.decide(1.0, metrics=[metric]).step)
    assert mine_out == ref_out
    assert 3 < sum(mine_out) < 190


def test_relative_gnts_threshold_scales_with_single_microbatch_norm():
    for scale in (1.0, 1000.0):  # the same relative value gives the same decisions at any scale
        ctrl = GNTS(mode="relative", ema=0.5)
        core = GQCCore(ctrl, max_microbatches=10, threshold=0.6)
        seq = []
        for norm in (2.0, 1.5, 1.0, 2.0, 1.1):
            core.add_microbatch()
            seq.append(core.decide(norm * scale).step)
        assert seq == [False, False, True, False, True]
        assert ctrl.reference == pytest.approx(2.0 * scale)


def test_core_state_roundtrip_and_refuses_mid_window():
    core = GQCCore(GNTS(mode="relative"), max_microbatches=4, threshold=0.7)
    core.add_microbatch(items=5, tokens=6)
    with pytest.raises(RuntimeError):
        core.state_dict()
    core.decide(0.0)
    state = core.state_dict()
    other = GQCCore(GNTS(mode="relative"), max_microbatches=4, threshold=0.7)
    other.load_state_dict(state)
    assert other.totals == core.totals and other.controller.reference == core.controller.reference
    with pytest.raises(ValueError):
        GQCCore(SBC(), threshold=1).load_state_dict(state)
    assert math.isfinite(other.totals["items"])
