from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _grad_helpers import dense, ragged_batch, rel_err, tiny_gpt2

from hf_gradext.grad import CaptureEngine, per_sample_gradients
from hf_gradext.grad.factors import materialize_sum


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
