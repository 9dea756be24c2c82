"""LR coupled to the window size (``--gqc_lr_coupling``) and Seesaw (``--gqc seesaw``): the exact schedules.

Oracle: the closed forms of docs/gqc.md written out here independently (HF's linear / cosine-with-warmup
LR factor, the Seesaw growth points ``f(t) = 2^-j`` solved analytically), against the LR the optimizer's
param groups hold at every ``optimizer.step()`` of a real run.
"""

from __future__ import annotations

import math

import pytest
from _gqc_tiny import gqc_args, tiny_model, token_dataset
from transformers import TrainerCallback

from hf_gradext.errors import UserFacingError
from hf_gradext.gqc.lr_coupling import PowerCoupling, SeesawPlan, build_coupling, scaled_lr
from hf_gradext.trainer import GradExtTrainer

LR = 1e-3


class _StepLRs(TrainerCallback):
    """The first param group's LR at each optimizer step (what ``optimizer.step()`` uses)."""

    def __init__(self):
        self.lrs = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def _run(tmp_path, n_samples, **overrides):
    rec = _StepLRs()
    kw = dict(learning_rate=LR, max_grad_norm=0.0, **overrides)
    trainer = GradExtTrainer(
        tiny_model(), args=gqc_args(tmp_path, **kw), train_dataset=token_dataset(n_samples)
    )
    trainer.add_callback(rec)
    trainer.train()
    windows = [int(e["gqc/microbatches"]) for e in trainer.state.log_history if "gqc/microbatches" in e]
    starts = [sum(windows[:i]) for i in range(len(windows))]
    return trainer, windows, starts, rec.lrs


def _cosine_factor(t: float, warmup: int, horizon: int) -> float:
    """HF's get_cosine_schedule_with_warmup factor at scheduler step ``t``."""
    if t < warmup:
        return t / warmup
    return 0.5 * (1 + math.cos(math.pi * (t - warmup) / (horizon - warmup)))


def test_seesaw_windows_and_lrs_follow_the_closed_form(tmp_path):
    horizon, warmup = 32, 4  # 128 samples / batch 4 = 32 microbatches; cap 4 = k0 x 2^2: two doublings
    trainer, windows, starts, lrs = _run(
        tmp_path, 128, gqc="seesaw", gqc_threshold_start=1, gqc_max_microbatches=4,
        lr_scheduler_type="cosine", warmup_steps=warmup,
    )  # fmt: skip
    # growth j where the cosine factor reaches 2^-j: t_j = warmup + (H - warmup) acos(2^(1-j) - 1) / pi
    t1 = warmup + (horizon - warmup) * math.acos(0.0) / math.pi  # 18
    t2 = warmup + (horizon - warmup) * math.acos(-0.5) / math.pi  # 22.67
    want_windows, want_lrs, t = [], [], 0
    while t < horizon:
        j = (t >= t1) + (t >= t2)
        k = 2**j
        f = _cosine_factor(t, warmup, horizon)
        # before the cap stops growth: the peak (1 after warmup; the factor itself during warmup) x 2^(-j/2);
        # at the cap: the decay again, times 2^(J/2), J = 2
        peak = min(t / warmup, 1.0)  # running max of the factor
        want_lrs.append(LR * (peak * 2 ** (-j / 2) if j < 2 else f * 2.0))
        want_windows.append(k)
        t += k
    assert windows == want_windows == [1] * 18 + [2] * 3 + [4] * 2
    assert lrs == pytest.approx(want_lrs, rel=1e-9, abs=1e-15)
    logs = [e for e in trainer.state.log_history if "gqc/microbatches" in e]
    assert [e["learning_rate"] for e in logs] == pytest.approx(want_lrs, rel=1e-9, abs=1e-15)  # logged = used
    # the scheduler itself was never left at a multiplied LR: it ends at its own factor
    group = trainer.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(LR * _cosine_factor(horizon, warmup, horizon), abs=1e-15)


@pytest.mark.parametrize("kind, k0_flag", [("sqrt", 0), ("linear", 2)])
def test_coupled_lr_is_base_lr_at_window_start_times_window_ratio(tmp_path, kind, k0_flag):
    horizon = 24
    # sbc from 4 to 16 samples (1 -> 4 microbatches of 4) over the data: windows of several sizes
    _, windows, starts, lrs = _run(
        tmp_path, 96, gqc="sbc", gqc_threshold_start=4.0, gqc_threshold_end=16.0, gqc_schedule="linear",
        gqc_max_microbatches=4, lr_scheduler_type="linear", gqc_lr_coupling=kind, gqc_lr_coupling_k0=k0_flag,
    )  # fmt: skip
    assert len(set(windows)) >= 3
    k0 = k0_flag or windows[0]
    exponent = 0.5 if kind == "sqrt" else 1.0
    want = [LR * (1 - s / horizon) * (k / k0) ** exponent for k, s in zip(windows, starts, strict=True)]
    assert lrs == pytest.approx(want, rel=1e-9)


def test_seesaw_plan_without_room_to_grow_is_the_base_schedule():
    plan = SeesawPlan(k0=4, cap=4)
    for f in (0.0, 0.5, 1.0, 0.4, 0.1, 0.0):
        assert plan.start_window(f) == 4 and plan.lr_multiplier(f) == 1.0


def test_seesaw_plan_on_a_linear_decay_and_its_state_roundtrip():
    plan, horizon = SeesawPlan(k0=2, cap=16), 64  # J = 3 doublings
    seen, t = [], 0
    while t < horizon:
        f = 1 - t / horizon
        k = plan.start_window(f)
        seen.append((t, k, plan.seesaw_factor(f)))
        t += k
    # growth points f = 1/2, 1/4, 1/8 at t = 32, 48, 56; factors 1, 2^-1/2, 2^-1, then f x 2^(3/2)
    for t, k, factor in seen:
        j = (t >= 32) + (t >= 48) + (t >= 56)
        assert k == 2 * 2**j
        assert factor == pytest.approx(2 ** (-j / 2) if j < 3 else (1 - t / horizon) * 2**1.5)
    other = SeesawPlan(k0=2, cap=16)
    other.load_state_dict(plan.state_dict())
    assert (other.peak, other.growths, other.window) == (plan.peak, plan.growths, plan.window)


def test_power_coupling_latches_k0_and_scaled_lr_restores_exactly():
    import torch

    c = build_coupling("sqrt")
    assert isinstance(c, PowerCoupling) and c.multiplier(2) == 1.0 and c.multiplier(8) == 2.0
    assert PowerCoupling(1.0, 4).multiplier(2) == 0.5 and build_coupling("none") is None
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with scaled_lr(opt, 3.0):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.3)
    assert opt.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"gqc": "none", "gqc_lr_coupling": "sqrt"}, "--gqc_lr_coupling sqrt needs an adaptive --gqc"),
        ({"gqc": "seesaw", "gqc_lr_coupling": "linear"}, "--gqc_lr_coupling linear needs"),
        ({"gqc": "seesaw", "gqc_threshold_start": 1.5}, "--gqc seesaw reads --gqc_threshold_start"),
        (
            {"gqc": "seesaw", "gqc_threshold_start": 8, "gqc_max_microbatches": 4},
            r"\[1, --gqc_max_microbatches 4\]",
        ),
        ({"gqc": "seesaw", "lr_scheduler_type": "reduce_lr_on_plateau"}, "--gqc seesaw doubles"),
        ({"gqc": "gnts", "gqc_lr_coupling": "cube"}, "--gqc_lr_coupling 'cube' is unknown"),
        ({"gqc": "gns_sample", "gqc_gns_ema": 0.0}, "--gqc_gns_ema"),
    ],
)
def test_coupling_flags_are_validated_at_parse_time(tmp_path, kw, words):
    from hf_gradext.arguments import GradExtArguments

    with pytest.raises(UserFacingError, match=words) as info:
        GradExtArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)
    assert "\n" not in str(info.value)
