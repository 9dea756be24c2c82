from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _grad_helpers import dense, ragged_batch, rel_err, tiny_gpt2
from torch import nn

from hf_gradext.grad import CaptureEngine, LossScale, per_sample_gradients, register_layer_math
from hf_gradext.grad.api import token_mean_losses
from hf_gradext.grad.factors import Dense, materialize_sum


def _run(engine, model, batch, info):
    with engine.capture(info):
        model(**batch).loss.backward()


def test_capture_batch_rescales_hf_loss_to_sum_of_own_means():
    model, batch = tiny_gpt2(), ragged_batch()
    seen = []
    engine = CaptureEngine(model, "all", on_capture=lambda n, m, a, g: seen.append((n, a.shape, g.shape)))
    _run(engine, model, batch, batch)  # info = batch: loss is HF's token mean over the batch
    ref = per_sample_gradients(model, batch, dtype=torch.float64)
    for name, cs in engine.contributions().items():
        # HF's loss upcasts float64 logits to fp32, so the backwarded gradients are fp32-accurate.
        assert rel_err(dense(materialize_sum(cs)), dense(ref[name])) <= 1e-6, name
    shapes = {n: (a, g) for n, a, g in seen}
    assert shapes["transformer.h.0.attn.c_attn"] == ((4, 12, 32), (4, 12, 96))
    assert shapes["transformer.wpe"] == ((4, 12), (4, 12, 32))  # (1, T) position ids expanded per sample
    a, g = engine.pair("transformer.h.1.mlp.c_fc")
    assert torch.count_nonzero(g[3, 3:]) == 0  # padding rows exactly zero
    assert model.transformer.wte.weight.grad is not None  # weight_grads=True keeps ordinary .grad


def test_checkpointing_records_once_and_remove_stops():
    model, batch = tiny_gpt2(), ragged_batch()
    model.gradient_checkpointing_enable()
    engine = CaptureEngine(model, "all")
    _run(engine, model, batch, batch)
    assert all(len(v) == 1 for v in engine.records.values()) and len(engine.records) == 16
    engine.remove()
    _run(engine, model, batch, batch)
    assert engine.records == {}


def test_weight_grads_false_leaves_grads_alone():
    model, batch = tiny_gpt2(), ragged_batch()
    model.transformer.h[0].ln_1.weight.requires_grad_(False)
    engine = CaptureEngine(model, "mlp", weight_grads=False)
    _run(engine, model, batch, batch)
    assert all(p.grad is None for p in model.parameters())
    assert not model.transformer.h[0].ln_1.weight.requires_grad  # restored exactly as it was
    assert model.transformer.h[0].ln_2.weight.requires_grad
    assert len(engine.records) == 4


def test_unarmed_engine_captures_nothing():
    model, batch = tiny_gpt2(), ragged_batch()
    engine = CaptureEngine(model, "norm")
    model(**batch).loss.backward()
    assert engine.records == {}


def test_ddp_wrapped_model(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model, batch = tiny_gpt2(), ragged_batch()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        engine = CaptureEngine(ddp, "attn")
        with engine.capture(batch):
            ddp(**batch).loss.backward()
        ref = per_sample_gradients(model, batch, layers="attn", dtype=torch.float64)
        got = engine.contributions()
        assert set(got) == set(ref)
        for name, cs in got.items():
            assert rel_err(materialize_sum(cs), ref[name]) <= 1e-6  # HF loss: fp32 logits
    finally:
        dist.destroy_process_group()


def _frozen_by_user(model):
    """Freeze a few parameters the way a user would (whole module, one bias, one norm weight)."""
    frozen = ["transformer.wpe.weight", "transformer.h.1.mlp.c_fc.bias", "transformer.h.0.ln_1.weight"]
    params = dict(model.named_parameters())
    for n in frozen:
        params[n].requires_grad_(False)
    return frozen


def test_layer_math_inside_on_capture_with_weight_grads_false():
    # Regression: weight_grads=False freezes every parameter while armed, so math that read
    # requires_grad returned {} when a consumer called it from on_capture (inside the backward).
    model, batch = tiny_gpt2(), ragged_batch()
    frozen = _frozen_by_user(model)
    names = {id(p): n for n, p in model.named_parameters()}
    got: dict[str, list] = {}
    via_specs: dict[str, set[str]] = {}

    def on_capture(name, module, a, g):
        assert not any(p.requires_grad for p in model.parameters())  # really inside the frozen window
        for local, c in engine.math(name, a, g).items():
            got.setdefault(names[id(getattr(module, local))], []).append(c)
        via_specs[name] = set(engine.specs[name].math(module, a, g))  # consumers holding engine.specs

    engine = CaptureEngine(model, "all", on_capture=on_capture, keep=False, weight_grads=False)
    size = batch["input_ids"].shape[0]
    with engine.capture(LossScale.identity(size, batch["attention_mask"])):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        token_mean_losses(logits, batch["labels"], shift=True).sum().backward()
    engine.remove()
    assert all(p.grad is None for p in model.parameters())

    ref = per_sample_gradients(model, batch, dtype=torch.float64)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == set(ref) == trainable and not set(got) & set(frozen)
    for name, cs in got.items():
        assert rel_err(dense(materialize_sum(cs)), dense(ref[name])) <= 1e-10, name
    assert via_specs["transformer.h.0.ln_1"] == {"bias"} and via_specs["transformer.h.1.mlp.c_fc"] == {
        "weight"
    }
    assert "transformer.wpe" not in via_specs  # a module with nothing trainable is not even hooked
    assert engine.is_trainable(model.transformer.h[0].ln_2.weight)  # outside capture: live requires_grad
    assert not engine.is_trainable(model.transformer.h[0].ln_1.weight)


class _Scale(nn.Module):
    """``x * w + b`` over the last dim: a module type with math registered in the old 3-argument form."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(d, dtype=torch.float64))

    def forward(self, x):
        return x * self.w + self.b


class _Shift(nn.Module):
    """``x + s``: no registered math (the torch.func fallback handles it)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.randn(d, dtype=torch.float64))

    def forward(self, x):
        return x + self.s


@register_layer_math(_Scale, family="scale")
def _scale_math(module, a, g):  # ignores requires_grad on purpose: the engine must filter
    return {"w": Dense((g * a).sum(1)), "b": Dense(g.sum(1))}


def test_three_argument_math_and_fallback_respect_user_freezing():
    torch.manual_seed(0)
    model = nn.Sequential(_Scale(3), _Shift(3), nn.Linear(3, 2, dtype=torch.float64))
    model[0].b.requires_grad_(False)
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    got: dict[str, dict] = {}

    def on_capture(name, module, a, g):
        got[name] = {k: materialize_sum([c]) for k, c in engine.math(name, a, g).items()}

    engine = CaptureEngine(
        model, "all", on_capture=on_capture, keep=False, weight_grads=False, unsupported="torch.func"
    )
    with engine.capture(None):
        model(x).pow(2).sum().backward()
    assert {n: set(v) for n, v in got.items()} == {"0": {"w"}, "1": {"s"}, "2": {"weight", "bias"}}
    # float64 oracle: loop over samples (each sample's loss is its own term of the summed loss).
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(
            model(x[i : i + 1]).pow(2).sum(), [model[0].w, model[1].s, model[2].weight]
        )
        for (name, local), ref in zip([("0", "w"), ("1", "s"), ("2", "weight")], grads):
            assert rel_err(got[name][local][i], ref) <= 1e-12, (name, local)


def test_contribution_names_follow_a_replaced_parameter():
    # The id -> name map is cached across captures; a parameter swapped in later must still get its name.
    model, batch = tiny_gpt2(), ragged_batch()
    engine = CaptureEngine(model, "mlp")
    _run(engine, model, batch, batch)
    first = set(engine.contributions())
    engine.records = {}
    fc = model.transformer.h[0].mlp.c_fc
    fc.weight = nn.Parameter(fc.weight.detach().clone())
    model.zero_grad()
    _run(engine, model, batch, batch)
    got = engine.contributions()
    assert set(got) == first and "transformer.h.0.mlp.c_fc.weight" in got
    ref = per_sample_gradients(model, batch, layers="mlp", dtype=torch.float64)
    for name, cs in got.items():
        assert rel_err(materialize_sum(cs), ref[name]) <= 1e-6, name
