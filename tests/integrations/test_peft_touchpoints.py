"""peft assumptions (hf_gradext.integrations.peft): each drift, simulated, is one clear error."""

from __future__ import annotations

import functools

import pytest
from torch import nn

from hf_gradext.integrations import guard
from hf_gradext.integrations import peft as pi
from tests.helpers import make_tiny_gpt2
from tests.integrations.drift import assert_drift

peft = pytest.importorskip("peft")
VERSION = guard.installed_version("peft")


def _lora_model():
    return peft.get_peft_model(
        make_tiny_gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    )


_assert_drift = functools.partial(assert_drift, "peft")


def test_every_check_passes_on_the_installed_peft():
    pi.check_all()


def test_adapter_names_of_a_real_lora_model_match():
    model = _lora_model()
    adapters = [n for n, m in model.named_modules() if pi.is_lora_adapter(n, m)]
    assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters)
    assert len(adapters) == 2 * 2  # 2 blocks x (lora_A, lora_B)


def test_base_model_and_lora_layers_on_the_installed_peft():
    from transformers import GPT2LMHeadModel

    model = _lora_model()
    assert pi.is_peft_model(model) and isinstance(pi.base_model(model), GPT2LMHeadModel)
    dense = make_tiny_gpt2()
    assert not pi.is_peft_model(dense) and pi.base_model(dense) is dense
    assert pi.has_lora_layers(model) and not pi.has_lora_layers(dense)
    # adapters injected into a transformers model (no PeftModel wrapper, as model.add_adapter does) too
    injected = peft.inject_adapter_in_model(
        peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True), make_tiny_gpt2()
    )
    assert pi.has_lora_layers(injected) and not pi.is_peft_model(injected)


def test_adapter_modules_renamed(monkeypatch):
    from peft.tuners.lora import LoraLayer

    monkeypatch.setattr(LoraLayer, "adapter_layer_names", ("lora_down", "lora_up"))
    _assert_drift(
        lambda: pi.is_lora_adapter("x.lora_A.default", nn.Linear(2, 2)), pi.ADAPTER_NAMING, "lora_A"
    )


def test_adapter_names_list_gone(monkeypatch):
    from peft.tuners.lora import LoraLayer

    monkeypatch.delattr(LoraLayer, "adapter_layer_names")  # BaseTunerLayer's empty default shows through
    _assert_drift(lambda: pi.is_lora_adapter("x", nn.Linear(2, 2)), pi.ADAPTER_NAMING, "no longer named")


def test_selection_stops_on_renamed_adapters(monkeypatch):
    from peft.tuners.lora import LoraLayer

    from hf_gradext.grad.selection import select_modules

    model = _lora_model()
    monkeypatch.setattr(LoraLayer, "adapter_layer_names", ("lora_down", "lora_up"))
    _assert_drift(lambda: select_modules(model, "lora"), pi.ADAPTER_NAMING)


def test_get_base_model_deleted(monkeypatch):
    model = _lora_model()
    monkeypatch.delattr(peft.PeftModel, "get_base_model")
    _assert_drift(lambda: pi.base_model(model), pi.GET_BASE_MODEL, "does not exist")


def test_lora_layer_class_gone(monkeypatch):
    import peft.tuners.lora as lora

    model = _lora_model()
    monkeypatch.delattr(lora, "LoraLayer")
    _assert_drift(lambda: pi.has_lora_layers(model), pi.LORA_LAYER, "LoraLayer")


def test_default_projection_layers_follow_lora_layers(monkeypatch, tmp_path):
    import peft.tuners.lora as lora

    from hf_gradext.arguments import GradExtArguments
    from hf_gradext.projection.projector import resolve_proj_layers

    args = GradExtArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    model = _lora_model()
    assert resolve_proj_layers(args, model) == "lora"
    monkeypatch.delattr(lora, "LoraLayer")
    guard.reset_checks()
    _assert_drift(lambda: resolve_proj_layers(args, model), pi.LORA_LAYER)
