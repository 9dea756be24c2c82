"""Each assumption of the GPT-2 mask cache fails loudly (touchpoint + version) when it breaks."""

from __future__ import annotations

from importlib import metadata

import pytest
from transformers import masking_utils
from transformers.models.gpt2 import modeling_gpt2

from hf_gradext.integrations import gpt2, guard
from hf_gradext.patches import mask_cache


@pytest.fixture(autouse=True)
def _fresh_checks():
    mask_cache.uninstall_mask_cache()
    guard.reset_checks()
    yield
    guard.reset_checks()
    mask_cache.uninstall_mask_cache()


def test_real_versions_pass():
    gpt2.check_mask_cache_touchpoints()
    gpt2.check_construction_touchpoints()
    assert gpt2.create_causal_mask_cache_name() in ("past_key_values", "cache")


def _assert_drift(excinfo, touchpoint):
    text = str(excinfo.value)
    assert touchpoint in text and metadata.version("transformers") in text and "\n" not in text


def test_create_causal_mask_without_a_cache_parameter(monkeypatch):
    monkeypatch.setattr(
        masking_utils,
        "create_causal_mask",
        lambda config, inputs_embeds, attention_mask, position_ids=None: None,
    )
    with pytest.raises(guard.IntegrationError) as excinfo:
        mask_cache.install_mask_cache()
    _assert_drift(excinfo, "masking_utils.create_causal_mask")
    assert not mask_cache.is_mask_cache_installed()


def test_keyword_only_deprecated_alias_is_not_a_second_cache_name(monkeypatch):
    # transformers 5.25: ``cache`` by position, ``past_key_values`` kept as a keyword-only alias.
    def create(config, inputs_embeds, attention_mask, cache, position_ids=None, *, past_key_values=None):
        return None

    monkeypatch.setattr(masking_utils, "create_causal_mask", create)
    assert gpt2.create_causal_mask_cache_name() == "cache"


def test_create_causal_mask_with_both_cache_names_by_position(monkeypatch):
    def create(config, inputs_embeds, attention_mask, cache, past_key_values=None, position_ids=None):
        return None

    monkeypatch.setattr(masking_utils, "create_causal_mask", create)
    with pytest.raises(guard.IntegrationError, match="exactly one of past_key_values / cache") as excinfo:
        gpt2.create_causal_mask_cache_name()
    _assert_drift(excinfo, "masking_utils.create_causal_mask")


def test_gpt2_forward_with_another_cache_name(monkeypatch):
    def forward(self, input_ids=None, kv=None, attention_mask=None, position_ids=None, inputs_embeds=None):
        return create_causal_mask()  # noqa: F821 - only its code object is inspected

    monkeypatch.setattr(modeling_gpt2.GPT2Model, "forward", forward)
    with pytest.raises(guard.IntegrationError) as excinfo:
        mask_cache.install_mask_cache()
    _assert_drift(excinfo, "GPT2Model.forward")


def test_gpt2_forward_that_stops_calling_the_module_function(monkeypatch):
    name = gpt2.create_causal_mask_cache_name()
    guard.reset_checks()
    namespace: dict = {}
    exec(
        f"def forward(self, input_ids=None, {name}=None, attention_mask=None, position_ids=None, inputs_embeds=None):\n"
        "    return None\n",
        namespace,
    )
    monkeypatch.setattr(modeling_gpt2.GPT2Model, "forward", namespace["forward"])
    with pytest.raises(guard.IntegrationError, match="no longer calls the module-level create_causal_mask"):
        mask_cache.install_mask_cache()


def test_init_weights_gone(monkeypatch):
    monkeypatch.delattr(modeling_gpt2.GPT2PreTrainedModel, "_init_weights")
    monkeypatch.setattr(modeling_gpt2.GPT2PreTrainedModel, "_init_weights", None, raising=False)
    with pytest.raises(guard.IntegrationError) as excinfo:
        gpt2.check_construction_touchpoints()
    _assert_drift(excinfo, "GPT2PreTrainedModel.post_init/_init_weights")


def test_initialization_normal_without_std(monkeypatch):
    from transformers import initialization

    monkeypatch.setattr(initialization, "normal_", lambda tensor, mean=0.0: tensor)
    with pytest.raises(guard.IntegrationError) as excinfo:
        gpt2.check_construction_touchpoints()
    _assert_drift(excinfo, "GPT2PreTrainedModel.post_init/_init_weights")
    assert "initialization.normal_" in str(excinfo.value)


def test_is_custom_code_gone(monkeypatch):
    from transformers import modeling_utils

    monkeypatch.delattr(modeling_utils.PreTrainedModel, "is_custom_code")
    with pytest.raises(guard.IntegrationError, match="is_custom_code"):
        gpt2.check_construction_touchpoints()


def test_lm_head_layout_without_transformer():
    from types import SimpleNamespace

    with pytest.raises(guard.IntegrationError) as excinfo:
        gpt2.check_lm_head_layout(SimpleNamespace(transformer=None, lm_head=None))
    _assert_drift(excinfo, "GPT2LMHeadModel.__init__ layout")
