"""``--gqc_sample_norm_every N``: gns_sample captures per-sample norms on every N-th microbatch only.

What must hold: the flag is refused at parse time out of range or with another controller; the capture
is armed on exactly the run's microbatches ``0, N, 2N, ...`` (the others run with the hooks disarmed and
no per-sample math); N=1 decides exactly as a run that captures every microbatch; an unmeasured draw's
estimate is the float64 closed form with ``sum |g_i|^2`` imputed from the last measured microbatch and
the window's own count, weights and tested norm; a resumed run decides as an uninterrupted one.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from _gqc_tiny import (
    assert_same_decisions_after,
    gqc_args,
    pattern_dataset,
    tiny_model,
    token_dataset,
)

from hf_gradext.arguments import GradExtArguments
from hf_gradext.errors import UserFacingError
from hf_gradext.gqc import noise
from hf_gradext.gqc.controllers import GNSSample
from hf_gradext.gqc.sample_norms import SampleNormCapture
from hf_gradext.trainer import GradExtTrainer

# ---------------------------------------------------------------------------- parse time


@pytest.mark.parametrize(
    "kw, pattern",
    [
        ({"gqc": "gns_sample", "gqc_sample_norm_every": 0}, r"--gqc_sample_norm_every 0 is out of range"),
        ({"gqc": "gns_sample", "gqc_sample_norm_every": -2}, r"--gqc_sample_norm_every -2 is out of range"),
        (
            {"gqc": "gnts", "gqc_sample_norm_every": 4},
            r"--gqc_sample_norm_every 4 applies to --gqc gns_sample",
        ),
        (
            {"gqc": "none", "gqc_sample_norm_every": 2},
            r"--gqc_sample_norm_every 2 applies to --gqc gns_sample",
        ),
    ],
)
def test_flag_refused_at_parse_time_in_one_line(tmp_path, kw, pattern):
    with pytest.raises(UserFacingError, match=pattern) as info:
        GradExtArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)
    assert "\n" not in str(info.value)


def test_flag_parses_from_the_cli_and_reaches_the_controller(tmp_path):
    from transformers import HfArgumentParser

    from hf_gradext.gqc.controllers import build_controller

    argv = ["--output_dir", str(tmp_path), "--gqc", "gns_sample", "--gqc_sample_norm_every", "8"]
    (a,) = HfArgumentParser(GradExtArguments).parse_args_into_dataclasses(argv + ["--use_cpu", "true"])
    assert a.gqc_sample_norm_every == 8
    assert build_controller(a).sample_norm_every == 8


# ---------------------------------------------------------------------------- the loop


def _train(tmp_path, data, **overrides):
    kw = dict(gqc="gns_sample", gqc_max_microbatches=4, max_grad_norm=0.0)
    trainer = GradExtTrainer(tiny_model(), args=gqc_args(tmp_path, **{**kw, **overrides}), train_dataset=data)
    trainer.train()
    return trainer


class _Spy:
    """Records, per microbatch, whether the capture was armed, its sq norms, and what the controller saw."""

    def __init__(self, monkeypatch):
        self.armed_at: list[int] = []  # the run's microbatch index at each armed capture
        self.sq: list[torch.Tensor] = []  # (B,) per measured microbatch
        self.obs: list = []
        self.estimates: list = []  # controller.last after each decide (ema 1: the window's own estimate)
        real_mb, real_sq, real_decide = (
            SampleNormCapture.microbatch,
            SampleNormCapture.sq_norms,
            GNSSample.decide,
        )
        spy = self

        def microbatch(capture, trainer, inputs, num_items):
            spy.armed_at.append(int(trainer._gqc_run.core.totals["microbatches"]))
            return real_mb(capture, trainer, inputs, num_items)

        def sq_norms(capture):
            sq = real_sq(capture)
            spy.sq.append(sq.detach().clone())
            return sq

        def decide(ctrl, obs):
            out = real_decide(ctrl, obs)
            spy.obs.append(obs)
            spy.estimates.append(ctrl._window_estimate)
            return out

        monkeypatch.setattr(SampleNormCapture, "microbatch", microbatch)
        monkeypatch.setattr(SampleNormCapture, "sq_norms", sq_norms)
        monkeypatch.setattr(GNSSample, "decide", decide)


def _windows(trainer):
    return [e["gqc/microbatches"] for e in trainer.state.log_history if "gqc/microbatches" in e]


def test_only_every_nth_microbatch_is_captured_across_epochs(tmp_path, monkeypatch):
    from hf_gradext.grad.capture import CaptureEngine

    spy = _Spy(monkeypatch)
    grad_hooks, per_mb = [0], []  # backward-hook records per microbatch (0: the hooks did nothing)
    real_hook, real_decide = CaptureEngine._grad_hook, GNSSample.decide

    def grad_hook(engine, *a):
        grad_hooks[0] += 1
        return real_hook(engine, *a)

    def decide(ctrl, obs):
        per_mb.append(grad_hooks[0])
        grad_hooks[0] = 0
        return real_decide(ctrl, obs)

    monkeypatch.setattr(CaptureEngine, "_grad_hook", grad_hook)
    monkeypatch.setattr(GNSSample, "decide", decide)
    # 10 microbatches per epoch x 2 epochs: the count runs over the epoch boundary (index 10 is not a
    # multiple of 3, so a per-epoch counter would arm it).
    trainer = _train(
        tmp_path, token_dataset(40), gqc_threshold_start=0.5, gqc_sample_norm_every=3, num_train_epochs=2
    )
    assert trainer.state.log_history[-1]["gqc/total_microbatches"] == 20
    assert spy.armed_at == [0, 3, 6, 9, 12, 15, 18]
    assert len(spy.sq) == 7  # per-sample math only on armed microbatches
    assert [n > 0 for n in per_mb] == [i % 3 == 0 for i in range(20)]  # disarmed: no record at all
    assert [o.sample_norms_measured for o in spy.obs] == [i % 3 == 0 for i in range(20)]
    for o in spy.obs:
        if not o.sample_norms_measured:
            assert o.sample_stats.sq_sum == 0.0 and o.sample_stats.count == 4  # exact count, nothing captured


def test_every_1_decides_as_a_run_that_captures_every_microbatch(tmp_path, monkeypatch):
    data = pattern_dataset()  # between identical and random sequences: windows of several sizes
    kw = dict(gqc_threshold_start=0.3, gqc_gns_ema=0.5, num_train_epochs=2)
    spy = _Spy(monkeypatch)
    every1 = _train(tmp_path / "every1", data, gqc_sample_norm_every=1, **kw)
    assert spy.armed_at == list(range(24)) and all(o.sample_norms_measured for o in spy.obs)
    # Reference: today's behaviour forced (capture on every microbatch, nothing imputed), independent
    # of the sample_norm_every bookkeeping.
    monkeypatch.setattr(GNSSample, "measures", lambda self, index: True)
    forced = _train(tmp_path / "forced", data, **kw)

    def log(t):
        return [
            (e["gqc/microbatches"], e["gqc/b_simple"]) for e in t.state.log_history if "gqc/b_simple" in e
        ]

    assert len(log(every1)) > 2 and len({w for w, _ in log(every1)}) > 1  # decisions matter
    assert log(every1) == log(forced)  # bit-identical: the same floats, not approximately
    # and the flag matters: measuring every 4th microbatch gives other estimates
    monkeypatch.undo()
    every4 = _train(tmp_path / "every4", data, gqc_sample_norm_every=4, **kw)
    assert [b for _, b in log(every4)] != [b for _, b in log(every1)]


def _label_counts(labels: torch.Tensor) -> torch.Tensor:
    """(B,) float64 label tokens per sample under the causal shift (position 0 predicts nothing)."""
    return labels[:, 1:].ne(-100).sum(1).to(torch.float64)


def test_unmeasured_draw_estimate_equals_a_float64_hand_computation(tmp_path, monkeypatch):
    data = token_dataset(24, ragged=True)  # ragged labels: unequal token weights, W2 > 1/N
    inputs = []

    class Recorder:
        def before_microbatch(self, trainer, batch, num_items):
            inputs.append(batch["labels"].detach().clone())

        def after_microbatch(self, trainer, batch, loss):
            pass

    spy = _Spy(monkeypatch)
    args = gqc_args(
        tmp_path, gqc="gns_sample", gqc_max_microbatches=3, max_grad_norm=0.0, gqc_threshold_start=0.0,
        gqc_sample_norm_every=2, max_steps=1,
    )  # fmt: skip
    trainer = GradExtTrainer(tiny_model(), args=args, train_dataset=data)
    trainer.add_microbatch_observer(Recorder())
    trainer.train()
    # threshold 0 never passes on random data: one window of 3 draws, measured / unmeasured / measured
    assert _windows(trainer) == [3] and spy.armed_at == [0, 2] and len(spy.sq) == 2
    n0, n1, n2 = (_label_counts(lab) for lab in inputs[:3])  # (B,) each
    sq0 = spy.sq[0].double()  # (B,) measured |g_i|^2 of microbatch 0

    # Unmeasured draw 1: its own count and weights, exact
    st1 = spy.obs[1].sample_stats
    assert (st1.count, st1.sq_sum) == (float(n1.gt(0).sum()), 0.0)
    assert st1.weight_sum == float(n1.sum()) and st1.weight_sq_sum == float(n1.pow(2).sum())

    def closed_form(sq_total: float, count: float, n: torch.Tensor, m: float) -> tuple[float, float]:
        s = sq_total / count
        w2 = float(n.pow(2).sum() / n.sum() ** 2)
        return (s - m) / (1 - w2), (m - w2 * s) / (1 - w2)

    s_last = float(sq0[n0.gt(0)].sum()) / float(n0.gt(0).sum())  # mean |g_i|^2 of the measured samples
    c0, c1 = float(n0.gt(0).sum()), float(n1.gt(0).sum())
    m1 = spy.obs[1].mean_grad_norm ** 2  # the window's tested norm, measured on every draw
    trace, signal = closed_form(float(sq0.sum()) + c1 * s_last, c0 + c1, torch.cat([n0, n1]), m1)
    est = spy.estimates[1]
    assert est.trace_sigma == pytest.approx(trace, rel=1e-12)
    assert est.signal_sq == pytest.approx(signal, rel=1e-12)
    assert est.n_eff == pytest.approx(
        float(torch.cat([n0, n1]).sum() ** 2 / torch.cat([n0, n1]).pow(2).sum())
    )

    # Measured draw 2 joins with its real norms; the imputed part of draw 1 stays as it was decided
    sq2 = spy.sq[1].double()
    c2 = float(n2.gt(0).sum())
    m2 = spy.obs[2].mean_grad_norm ** 2
    trace, signal = closed_form(
        float(sq0.sum()) + c1 * s_last + float(sq2.sum()), c0 + c1 + c2, torch.cat([n0, n1, n2]), m2
    )
    assert spy.estimates[2].trace_sigma == pytest.approx(trace, rel=1e-12)
    assert spy.estimates[2].signal_sq == pytest.approx(signal, rel=1e-12)
    assert trainer._gqc_run.core.controller.last_mean_sq == pytest.approx(
        float(sq2[n2.gt(0)].sum()) / c2, rel=1e-12
    )


def test_controller_imputes_from_the_last_measured_microbatch():
    ctrl = GNSSample(sample_norm_every=4)
    assert ctrl.measures(5)  # nothing measured yet: measure whatever the index
    from hf_gradext.gqc.controllers import Observation

    measured = noise.SampleNormStats(count=4, sq_sum=8.0, weight_sum=4, weight_sq_sum=4)
    ctrl.decide(Observation(k=1, mean_grad_norm=1.0, threshold=0.1, sample_stats=measured))
    assert ctrl.last_mean_sq == 2.0
    assert [ctrl.measures(i) for i in range(9)] == [i % 4 == 0 for i in range(9)]
    weights_only = noise.SampleNormStats(count=2, sq_sum=0.0, weight_sum=2, weight_sq_sum=2)
    ctrl.decide(
        Observation(
            k=2, mean_grad_norm=1.0, threshold=0.1, sample_stats=weights_only, sample_norms_measured=False
        )
    )
    assert ctrl.window == noise.SampleNormStats(count=6, sq_sum=12.0, weight_sum=6, weight_sq_sum=6)
    assert ctrl.last_mean_sq == 2.0  # an imputed draw does not feed the carried value
    other = GNSSample(sample_norm_every=4)
    other.load_state_dict(json.loads(json.dumps(ctrl.state_dict())))
    assert other.last_mean_sq == 2.0 and not other.measures(5)
    with pytest.raises(ValueError, match="sample_norm_every"):
        GNSSample(sample_norm_every=0)
    with pytest.raises(RuntimeError, match="unmeasured"):
        GNSSample(sample_norm_every=4).decide(
            Observation(
                k=1, mean_grad_norm=1.0, threshold=0.1, sample_stats=weights_only, sample_norms_measured=False
            )
        )


def test_weight_vector_matches_sample_norm_vector_except_sq_sum():
    w = torch.tensor([3.0, 0.0, 5.0, 1.0])
    full = noise.sample_norm_vector(torch.tensor([1.0, 0.0, 2.0, 4.0]), w)
    cheap = noise.weight_vector(w, 4, "cpu")
    assert cheap[1] == 0 and torch.equal(cheap[[0, 2, 3]], full[[0, 2, 3]])
    assert noise.weight_vector(None, 4, "cpu").tolist() == [4.0, 0.0, 4.0, 4.0]


def test_resume_with_every_n_gives_the_decisions_of_an_uninterrupted_run(tmp_path, monkeypatch):
    kw = dict(
        gqc="gns_sample", gqc_max_microbatches=4, max_grad_norm=0.0, gqc_threshold_start=0.3,
        gqc_gns_ema=0.5, gqc_sample_norm_every=3, save_strategy="steps", save_steps=2, num_train_epochs=2,
    )  # fmt: skip
    full = GradExtTrainer(
        tiny_model(), args=gqc_args(tmp_path / "full", **kw), train_dataset=pattern_dataset()
    )
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-2"
    state = json.loads((ckpt / "gqc_state.json").read_text())
    done = int(state["core"]["totals"]["microbatches"])
    # The checkpoint sits between measured microbatches and the next draw imputes from the saved value:
    # a counter restarted at 0, or a lost carried value, would measure there and decide differently.
    assert done % 3 != 0 and math.isfinite(state["core"]["controller_state"]["last_mean_sq"])
    spy = _Spy(monkeypatch)
    resumed = GradExtTrainer(
        tiny_model(), args=gqc_args(tmp_path / "resumed", **kw), train_dataset=pattern_dataset()
    )
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert spy.armed_at and all(i % 3 == 0 for i in spy.armed_at) and spy.armed_at[0] > done

    assert_same_decisions_after(full, resumed, 2, rel=1e-6)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_measure_the_same_microbatches_and_decide_alike(tmp_path):
    from test_gns_sample_ddp import SCRIPT

    from tests.helpers import accelerate_launch

    script = SCRIPT
    for old, new in [
        (
            "obs.sample_stats.weight_sq_sum]",
            "obs.sample_stats.weight_sq_sum, float(obs.sample_norms_measured)]",
        ),
        ("gqc_max_microbatches=4,", "gqc_max_microbatches=4, gqc_sample_norm_every=3,"),
    ]:
        assert script.count(old) == 1, f"{old!r} no longer in test_gns_sample_ddp.SCRIPT"
        script = script.replace(old, new)
    (tmp_path / "run.py").write_text(script)
    proc = accelerate_launch([str(tmp_path / "run.py"), str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["world"] == 2 and r0["steps"] == r1["steps"]
    assert sum(s[1] for s in r0["steps"]) == 12
    assert r0["reduced"] == r1["reduced"]  # the same numbers, the same measured flags, on both ranks
    assert [bool(r[4]) for r in r0["reduced"]] == [i % 3 == 0 for i in range(12)]
    assert len(r0["local"]) == len(r1["local"]) == 4  # each rank captured microbatches 0, 3, 6, 9 only
    measured = [r for r in r0["reduced"] if r[4]]
    for red, a, b in zip(measured, r0["local"], r1["local"], strict=True):
        assert red[:4] == pytest.approx([x + y for x, y in zip(a, b, strict=True)], rel=1e-12)
    for red in r0["reduced"]:
        if not red[4]:
            assert red[0] == 4 and red[1] == 0.0  # 2 samples x 2 ranks counted, sq_sum left to the controller
