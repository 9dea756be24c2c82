"""Threshold schedules over data consumed, against closed forms."""

from __future__ import annotations

import math
import warnings

import pytest

from hf_gradext.gqc.schedules import ThresholdSchedule


def test_inverse_warmup_then_shapes():
    kw = dict(start=1.0, end=0.2, horizon=110, warmup=10, warmup_multiplier=5.0)
    for kind in ("constant", "linear", "cosine", "polynomial"):
        s = ThresholdSchedule(kind=kind, **kw)
        assert s(0) == pytest.approx(5.0) and s(5) == pytest.approx(3.0) and s(10) == pytest.approx(1.0)
    assert ThresholdSchedule(kind="constant", **kw)(100) == 1.0
    assert ThresholdSchedule(kind="linear", **kw)(60) == pytest.approx(0.6)
    assert ThresholdSchedule(kind="cosine", **kw)(60) == pytest.approx(
        0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 2))
    )
    assert ThresholdSchedule(kind="polynomial", power=2.0, **kw)(60) == pytest.approx(0.2 + 0.8 * 0.25)
    for kind in ("linear", "cosine", "polynomial"):
        assert ThresholdSchedule(kind=kind, **kw)(500) == pytest.approx(0.2)  # past the horizon: end


def test_bad_kind_rejected():
    with pytest.raises(ValueError):
        ThresholdSchedule(start=1, end=1, horizon=10, kind="step")


def test_cosine_is_the_half_cosine_and_quarter_cosine_is_torch_gqcs():
    kw = dict(start=0.95, end=0.25, horizon=110, warmup=10, warmup_multiplier=10.0)
    half, alias = ThresholdSchedule(kind="half_cosine", **kw), ThresholdSchedule(kind="cosine", **kw)
    quarter = ThresholdSchedule(kind="quarter_cosine", **kw)
    for t in range(0, 120, 7):
        assert alias(t) == half(t)
    assert quarter(60) == pytest.approx(0.25 + 0.7 * math.cos(math.pi / 4))  # mid-span: 29% of the way
    assert half(60) == pytest.approx(0.25 + 0.7 * 0.5)
    assert quarter(110) == pytest.approx(0.25) and quarter(500) == pytest.approx(0.25)


_TSA_CASES = [
    ("cosine_annealing_with_warmup", (0.9, 0.2, 7, 50), {}),
    ("cosine_annealing_with_inverse_warmup", (0.95, 0.25, 7, 50), {"warmup_multiplier": 10.0}),
    ("cosine_annealing_with_inverse_warmup", (0.95, 0.25, 0, 50), {}),
    ("polynomial_schedule_with_warmup", (16.0, 64.0, 6, 50), {"polynomial_exponent": 3.0}),
    ("polynomial_schedule_with_inverse_warmup", (1.0, 0.1, 6, 50), {"warmup_multiplier": 4.0}),
    ("linear_schedule_with_warmup", (1.0, 0.1, 6, 50), {}),
    ("linear_schedule_with_inverse_warmup", (1.0, 0.1, 6, 50), {}),
    ("constant_with_warmup", (0.7, 9), {}),
    ("constant_with_inverse_warmup", (0.7, 9), {"warmup_multiplier": 20.0}),
]


@pytest.mark.parametrize(("name", "args", "kwargs"), _TSA_CASES)
def test_schedule_anything_named_factories_equal_torch_gqcs_curves(name, args, kwargs):
    tsa = pytest.importorskip("torch_schedule_anything")
    import torch

    from hf_gradext.gqc import schedules

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)  # lr 1.0: the value is the multiplier
    ref = getattr(tsa, name)(opt, *args, **kwargs, schedule_target="lr")
    mine = getattr(schedules, name)(*args, **kwargs)
    horizon = args[3] if len(args) == 4 else args[1] + 20
    for t in range(horizon + 1):  # within the horizon (past it torch-schedule-anything extrapolates)
        assert mine(t) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15), t
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the library's adapter hides opt.step from LambdaLR's check
            opt.step()
            ref.step()
