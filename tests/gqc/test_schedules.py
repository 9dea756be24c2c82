"""Threshold schedules over data consumed, against closed forms."""

from __future__ import annotations

import math

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
