"""``GQCOptimizer`` parity with torch-gqc's quickstart loops (schedulers, factories, statistics, errors)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from hf_gradext.errors import UserFacingError
from hf_gradext.gqc import factories
from hf_gradext.gqc.wrapper import GQCOptimizer

gqc_ref = pytest.importorskip("gradient_quality_control")
tsa = pytest.importorskip("torch_schedule_anything")
from gradient_quality_control.implementations.metric_hypothesis_test import OptimizerWrapperMHT  # noqa: E402


def _stream(n: int, seed: int = 0):
    """Microbatches (x, y) of 8 samples whose gradient norm wanders around 1-10."""
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        x = torch.randn(8, 6, generator=g) * (0.5 + (i % 7) / 3)
        yield x, x.sum(1, keepdim=True) + torch.randn(8, 1, generator=g)


def _models():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1)
    return model, copy.deepcopy(model)


def _run(ref, mine, ref_model, my_model, n=60, ref_args=(), my_kwargs=None, schedules=()):
    """Same stream through both; returns both decision lists (and checks the parameters agree)."""
    ref_out, my_out = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch-gqc gns: variance of one value
        for x, y in _stream(n):
            losses = []
            for model in (ref_model, my_model):
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                losses.append(loss.item())
            ref_out.append(ref.step(*((losses[0],) if ref_args == "metric" else ())))
            my_out.append(mine.step(*((losses[1],) if ref_args == "metric" else ()), **(my_kwargs or {})))
            for s in schedules:
                s.step()
    for a, b in zip(my_model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    return ref_out, my_out


def test_is_an_optimizer_sharing_the_wrapped_state():
    inner = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    opt = GQCOptimizer(inner, "gnts")
    assert isinstance(opt, torch.optim.Optimizer)
    assert (
        opt.param_groups is inner.param_groups and opt.state is inner.state and opt.defaults is inner.defaults
    )
    opt.param_groups[0]["lr"] = 0.5
    assert inner.param_groups[0]["lr"] == 0.5
    inner.custom_setting = 3
    assert opt.custom_setting == 3  # other attributes fall through to the wrapped optimizer
    extra = torch.nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [extra]})
    assert len(inner.param_groups) == 2 and any(p is extra for p in opt._params)


def test_lambda_lr_attaches_and_matches_torch_gqc_with_a_schedule_anything_lr():
    ref_model, my_model = _models()
    ref = gqc_ref.OptimizerWrapperGNTS(torch.optim.SGD(ref_model.parameters(), lr=0.1), max_batch_draws=5)
    for g in ref.optimizer.param_groups:
        g["gradient_norm_threshold"] = 3.0
    ref_lr = tsa.cosine_annealing_with_warmup(ref, 1.0, 0.0, 5, 60, schedule_target="lr")
    mine = GQCOptimizer(
        torch.optim.SGD(my_model.parameters(), lr=0.1), "gnts", threshold=3.0, max_microbatches=5
    )
    lam = factories.S.cosine_annealing_with_warmup(1.0, 0.0, 5, 60)
    my_lr = torch.optim.lr_scheduler.LambdaLR(mine, lam)
    lrs = []
    ref_out, my_out = [], []
    for x, y in _stream(60):
        for model in (ref_model, my_model):
            torch.nn.functional.mse_loss(model(x), y).backward()
        ref_out.append(ref.step())
        my_out.append(mine.step())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's LambdaLR cannot see torch-gqc's step (not an Optimizer)
            ref_lr.step()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # ours: no "lr_scheduler.step() before optimizer.step()" warning
            my_lr.step()
        lrs.append(mine.optimizer.param_groups[0]["lr"])
        assert lrs[-1] == pytest.approx(ref.optimizer.param_groups[0]["lr"], rel=1e-12)
    assert my_out == ref_out and 5 < sum(my_out) < 55
    assert my_lr.get_last_lr() == [pytest.approx(lrs[-1])]
    for a, b in zip(my_model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("conventional", [False, True])
def test_gnts_factory_matches_torch_gqc(conventional):
    ref_model, my_model = _models()
    name = "make_gnts_with_cosine_annealing_schedule" + ("_conventional_lr" if conventional else "")
    kw = dict(
        num_training_steps=60,
        num_warmup_steps=8,
        initial_threshold=4.0,
        final_threshold=1.5,
        max_batch_draws=6,
    )
    ref, ref_s = getattr(gqc_ref, name)(
        torch.optim.AdamW(ref_model.parameters(), lr=0.05, weight_decay=0.1), **kw
    )
    mine, my_s = getattr(factories, name)(
        torch.optim.AdamW(my_model.parameters(), lr=0.05, weight_decay=0.1), **kw
    )
    ref_out, my_out = _run(ref, mine, ref_model, my_model, schedules=(ref_s, my_s))
    assert my_out == ref_out and 5 < sum(my_out) < 55
    for key in ("lr", "weight_decay"):
        assert mine.optimizer.param_groups[0][key] == pytest.approx(
            ref.optimizer.param_groups[0][key], rel=1e-12
        )


@pytest.mark.parametrize("conventional", [False, True])
def test_sbc_factory_matches_torch_gqc(conventional):
    ref_model, my_model = _models()
    name = "make_sbc_with_polynomial_schedule" + ("_conventional_lr" if conventional else "")
    kw = dict(
        physical_batch_size=8,
        initial_batch_size=16,
        final_batch_size=64,
        num_training_steps=60,
        num_warmup_steps=6,
    )
    ref, ref_s = getattr(gqc_ref, name)(torch.optim.AdamW(ref_model.parameters(), lr=0.05), **kw)
    mine, my_s = getattr(factories, name)(torch.optim.AdamW(my_model.parameters(), lr=0.05), **kw)
    ref_out, my_out = _run(ref, mine, ref_model, my_model, schedules=(ref_s, my_s))
    assert my_out == ref_out and 5 < sum(my_out) < 55


@pytest.mark.parametrize("default", [False, True])
def test_gns_factories_match_torch_gqc(default):
    ref_model, my_model = _models()
    if default:
        kw = dict(tolerance=0.02, num_training_steps=60, num_warmup_steps=5, max_batch_draws=8)
        name = "make_gns_default"
    else:
        kw = dict(initial_tolerance=0.05, final_tolerance=0.01, num_training_steps=60, num_warmup_steps=5)
        name = "make_gns_with_cosine_annealing_schedule"
    ref, ref_s = getattr(gqc_ref, name)(torch.optim.SGD(ref_model.parameters(), lr=0.05), **kw)
    mine, my_s = getattr(factories, name)(torch.optim.SGD(my_model.parameters(), lr=0.05), **kw)
    ref_out, my_out = _run(ref, mine, ref_model, my_model, schedules=(ref_s, my_s))
    assert my_out == ref_out and 3 < sum(my_out) < 40


def _pairs():
    """(torch-gqc wrapper, GQCOptimizer, step-argument mode) for every shared controller, same settings."""
    out = []
    for name in ("gnts", "sbc", "gns", "mht"):
        ref_model, my_model = _models()
        ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=0.01)
        my_opt = torch.optim.AdamW(my_model.parameters(), lr=0.01)
        if name == "gnts":
            ref, key, value = (
                gqc_ref.OptimizerWrapperGNTS(ref_opt, max_batch_draws=6),
                "gradient_norm_threshold",
                3.0,
            )
            mine = GQCOptimizer(my_opt, "gnts", threshold=value, max_microbatches=6)
        elif name == "sbc":
            ref, key, value = (
                gqc_ref.OptimizerWrapperSBC(ref_opt, 8, max_batch_draws=6),
                "logical_batch_size",
                24.0,
            )
            mine = GQCOptimizer(my_opt, "sbc", threshold=value, max_microbatches=6, physical_batch_size=8)
        elif name == "gns":
            ref, key, value = gqc_ref.OptimizerWrapperGNS(ref_opt, max_batch_draws=6), "noise_tolerance", 0.02
            mine = GQCOptimizer(my_opt, "gns", threshold=value, max_microbatches=6)
        else:
            ref, key, value = OptimizerWrapperMHT(ref_opt, max_batch_draws=6), "percent_error_threshold", 0.2
            mine = GQCOptimizer(my_opt, "mht", threshold=value, max_microbatches=6)
            for g in ref.optimizer.param_groups:
                g["confidence_level"] = 0.95
        for g in ref.optimizer.param_groups:
            g[key] = value
        out.append((name, ref, mine, ref_model, my_model))
    return out


def test_statistics_have_torch_gqc_keys_and_values():
    for name, ref, mine, ref_model, my_model in _pairs():
        for n in (3, 17):  # mid-window and after a few steps
            _run(ref, mine, ref_model, my_model, n=n, ref_args="metric" if name == "mht" else ())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for behavior in ("verbose", "vital"):
                    theirs, ours = ref.statistics(behavior), mine.statistics(behavior)
                    assert set(theirs) <= set(ours), (name, behavior, set(theirs) - set(ours))
                    for key, value in theirs.items():
                        assert ours[key] == pytest.approx(value, rel=1e-5), (name, key)
                    if behavior == "vital":
                        assert set(ours) == set(theirs), (name, set(ours) ^ set(theirs))
        assert mine.statistics()["num_batches"] == 20 and mine.num_draws == ref.num_draws
    assert set(mine.vital_statistics()) == set(ref.vital_statistics())


def test_sbc_without_samples_and_mht_without_metric_raise_like_torch_gqc():
    model = torch.nn.Linear(2, 1)
    with pytest.raises(TypeError):  # torch-gqc: physical_batch_size is required
        gqc_ref.OptimizerWrapperSBC(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError):  # torch-gqc: step(metric) is required
        OptimizerWrapperMHT(torch.optim.SGD(model.parameters(), lr=0.1)).step()
    sbc = GQCOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "sbc", threshold=16)
    mht = GQCOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "mht", threshold=0.1)
    model(torch.ones(1, 2)).sum().backward()
    with pytest.raises(UserFacingError, match="samples="):
        sbc.step()
    with pytest.raises(UserFacingError, match=r"step\(loss.item\(\)\)"):
        mht.step()
    assert sbc.num_draws == 0 and mht.num_draws == 0  # nothing counted
    assert sbc.step(samples=8) is False  # 8 of 16 samples
    mht.step(1.0)
    assert mht.statistics()["num_batches"] == 1
    with pytest.raises(UserFacingError, match="closure"):
        mht.step(lambda: 1.0)


def test_distributed_modes():
    model = torch.nn.Linear(2, 1)
    with pytest.raises(UserFacingError, match="FSDP"):
        GQCOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), distributed_mode="sharded")
    with pytest.raises(UserFacingError, match="not initialized"):
        GQCOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), distributed_mode="replicated")
    assert GQCOptimizer(torch.optim.SGD(model.parameters(), lr=0.1)).world_size == 1
    with pytest.raises(UserFacingError, match="unknown GQC controller"):
        GQCOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "gnss")


def test_state_dict_roundtrip_restores_decisions():
    model = torch.nn.Linear(6, 1)
    a = GQCOptimizer(
        torch.optim.AdamW(model.parameters(), lr=0.01), "gns", threshold=0.02, max_microbatches=5
    )
    stream = list(_stream(60))
    out, i = [], 0
    while i < 20 or a.num_draws:  # state is saved between windows
        x, y = stream[i]
        torch.nn.functional.mse_loss(model(x), y).backward()
        out.append(a.step())
        i += 1
    clone = copy.deepcopy(model)
    b = GQCOptimizer(
        torch.optim.AdamW(clone.parameters(), lr=0.01), "gns", threshold=0.02, max_microbatches=5
    )
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # torch shares same-device state tensors on load
    assert b.statistics()["num_steps"] == a.statistics()["num_steps"] and len(b.state) == len(a.state)
    for x, y in stream[i:]:
        for m in (model, clone):
            torch.nn.functional.mse_loss(m(x), y).backward()
        assert a.step() == b.step()
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        torch.testing.assert_close(p, q)
