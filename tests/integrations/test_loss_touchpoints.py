"""Does the model's loss shift labels (hf_gradext.integrations.loss): the one answer, and its drifts."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.loss import loss_utils

from hf_gradext.integrations import guard
from hf_gradext.integrations import loss as li
from tests.helpers import make_tiny_gpt2
from tests.integrations.drift import assert_drift

VERSION = guard.installed_version("transformers")


_assert_drift = functools.partial(assert_drift, "transformers")


def _tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2)
    return T5ForConditionalGeneration(config)


# ------------------------------------------------------------------------------------- the installed release
def test_every_check_passes_on_the_installed_transformers():
    li.check_all()


def test_answers_on_real_models():
    gpt2 = make_tiny_gpt2()
    assert gpt2.loss_type is None  # GPT-2 names no loss type, yet its loss is the causal-LM one
    assert li.shifts_labels(gpt2)
    assert not li.shifts_labels(nn.Linear(2, 2))  # no built-in loss
    assert not li.shifts_labels(_tiny_t5())  # encoder-decoder: labels are not shifted
    masked = make_tiny_gpt2()
    masked.loss_function = loss_utils.ForMaskedLMLoss  # an explicitly set loss wins, as in the forward
    assert not li.shifts_labels(masked)


def test_wrappers_are_looked_through():
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(
        make_tiny_gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    assert li.shifts_labels(lora)
    compiled = torch.compile(make_tiny_gpt2())  # an OptimizedModule: nothing is compiled until it runs
    assert li.shifts_labels(compiled)


def test_gqc_loop_and_loss_scaling_both_ask_the_one_function(monkeypatch):
    from types import SimpleNamespace

    from hf_gradext.gqc.loop import _shifts_labels
    from hf_gradext.grad.loss_scaling import shifts_labels

    asked = []

    def recorder(model):
        asked.append(model)
        return True

    monkeypatch.setattr(li, "shifts_labels", recorder)
    model = nn.Linear(2, 2)
    assert shifts_labels(model) is True
    assert _shifts_labels(SimpleNamespace(model=model)) is True
    assert asked == [model, model]


# ------------------------------------------------------------------------------------------------- drifts
def test_causal_lm_loss_stops_shifting(monkeypatch):
    monkeypatch.setattr(loss_utils, "ForCausalLMLoss", loss_utils.ForMaskedLMLoss)
    _assert_drift(lambda: li.shifts_labels(make_tiny_gpt2()), li.CAUSAL_LM_LOSS, "shifted token-sum")


def test_causal_lm_loss_ignores_num_items(monkeypatch):
    original = loss_utils.ForCausalLMLoss

    def mean_loss(logits, labels, vocab_size, num_items_in_batch=None, **kwargs):
        return original(logits, labels, vocab_size, num_items_in_batch=None, **kwargs)

    monkeypatch.setattr(loss_utils, "ForCausalLMLoss", mean_loss)
    _assert_drift(lambda: li.shifts_labels(make_tiny_gpt2()), li.CAUSAL_LM_LOSS, "num_items_in_batch=1")


def test_causal_lm_loss_type_resolves_elsewhere(monkeypatch):
    monkeypatch.setitem(loss_utils.LOSS_MAPPING, "ForCausalLM", loss_utils.ForMaskedLMLoss)
    _assert_drift(lambda: li.shifts_labels(make_tiny_gpt2()), li.LOSS_FUNCTION, "ForMaskedLMLoss")


def test_loss_function_property_gone(monkeypatch):
    monkeypatch.delattr(PreTrainedModel, "loss_function")
    _assert_drift(lambda: li.shifts_labels(make_tiny_gpt2()), li.LOSS_FUNCTION, "not a property")
