"""apply_gradext dispatch by model_type and apply_from_args (the train entry point's call)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from _patch_tiny import tiny_model
from transformers import BertConfig, BertModel

from hf_gradext.errors import UserFacingError
from hf_gradext.patches import apply_from_args, apply_gradext, gpt2_config, mask_cache
from hf_gradext.patches.rms_norm import GradExtRMSNorm
from hf_gradext.patches.swiglu import GradExtSwiGLUMLP


def _bert():
    return BertModel(
        BertConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50
        )
    )


def _args(**kw):
    base = {
        "gpt2_causal_mask_cache": None,
        "gpt2_rms_norm": False,
        "gpt2_swiglu": False,
        "swiglu_hidden_size": None,
    }
    return SimpleNamespace(**{**base, **kw})


def test_dispatches_gpt2_models_and_type_strings():
    model = apply_gradext(tiny_model(), rms_norm=True)
    assert isinstance(model.transformer.ln_f, GradExtRMSNorm)
    assert mask_cache.is_mask_cache_installed()
    assert apply_gradext("gpt2", swiglu=True) is None
    assert gpt2_config.class_defaults() == {"gradext_swiglu": True}
    assert isinstance(tiny_model().transformer.h[0].mlp, GradExtSwiGLUMLP)


@pytest.mark.parametrize("flag", ["rms_norm", "swiglu", "causal_mask_cache"])
def test_any_flag_on_an_unsupported_type_names_the_type(flag):
    with pytest.raises(UserFacingError, match=rf"{flag}.*'bert'"):
        apply_gradext(_bert(), **{flag: True})
    with pytest.raises(UserFacingError, match="'llama'"):
        apply_gradext("llama", **{flag: True})


def test_unsupported_type_without_flags_is_returned_unchanged():
    bert = _bert()
    assert apply_gradext(bert, rms_norm=False, causal_mask_cache=None) is bert


def test_apply_from_args_defaults_turn_the_mask_cache_on_for_gpt2_only():
    model = apply_from_args(_args(), tiny_model())
    assert mask_cache.is_mask_cache_installed()
    assert not hasattr(model.config, "gradext_rms_norm")
    mask_cache.uninstall_mask_cache()
    bert = _bert()
    assert apply_from_args(_args(), bert) is bert
    assert not mask_cache.is_mask_cache_installed()


def test_apply_from_args_flags():
    model = apply_from_args(
        _args(gpt2_causal_mask_cache=False, gpt2_swiglu=True, swiglu_hidden_size=24), tiny_model()
    )
    assert model.transformer.h[1].mlp.gate_proj.out_features == 24
    assert not mask_cache.is_mask_cache_installed()
    with pytest.raises(UserFacingError, match="'bert'"):
        apply_from_args(_args(gpt2_rms_norm=True), _bert())
    with pytest.raises(UserFacingError, match="'bert'"):
        apply_from_args(_args(gpt2_causal_mask_cache=True), _bert())
