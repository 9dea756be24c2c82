import json

import pytest
import torch

from hf_gradext.collection import BatchCollector
from hf_gradext.collection.separate import eval_fp32, read_probe_texts, run_separate
from hf_gradext.errors import UserFacingError
from hf_gradext.grad.capture import CaptureEngine
from tests.collection._tiny import ragged_batch, tiny_gpt2


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("p.txt", "first text\n\nsecond text\n"),
        ("p.jsonl", '{"text": "first text"}\n{"text": "second text"}\n'),
        ("p.json", json.dumps(["first text", "second text"])),
        ("q.json", json.dumps([{"text": "first text"}, {"text": "second text"}])),
    ],
)
def test_read_probe_texts_formats(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    assert read_probe_texts(path) == ["first text", "second text"]


def test_read_probe_texts_rejects_empty(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n")
    with pytest.raises(UserFacingError, match="--gradient_collection_probe_file"):
        read_probe_texts(path)


def test_eval_fp32_restores_training_mode_and_disables_autocast():
    model = tiny_gpt2()
    with torch.autocast("cpu", dtype=torch.bfloat16), eval_fp32(model):
        assert not model.training
        assert model.transformer.h[0].mlp.c_fc(torch.randn(2, 32)).dtype == torch.float32
    assert model.training


def test_run_separate_refuses_an_engine_that_writes_weight_grads():
    model, batch = tiny_gpt2(), ragged_batch()
    engine = CaptureEngine(model, "mlp", keep=False)  # weight_grads=True: backward would fill param.grad
    with pytest.raises(ValueError, match="weight_grads=False"):
        run_separate(model, batch, 2, None, engine, [0, 1])
    engine.remove()
    assert all(p.grad is None for p in model.parameters())


def test_separate_pass_keeps_existing_grads_and_trainable_flags():
    model, batch = tiny_gpt2(), ragged_batch()
    model.transformer.h[1].ln_1.weight.requires_grad_(False)  # a frozen parameter stays frozen
    trainable = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0) if p.requires_grad else None  # an accumulation in progress
    with BatchCollector(model, None, layers="attn,mlp", save="stats") as collector:
        assert not collector.engine.weight_grads
        metrics = collector.collect(batch)
    assert metrics  # something was collected
    assert [p.requires_grad for p in model.parameters()] == trainable
    for p in model.parameters():
        assert p.grad is None if not p.requires_grad else bool((p.grad == 7.0).all())
