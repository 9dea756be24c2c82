"""Checkpoints saved by earlier hf_gradext versions (RMSNorm/SwiGLU as ``model_type: "gpt2"``).

Such a checkpoint loads in stock transformers as GPT-2 with random MLP weights, so hf_gradext refuses it
(one line, naming the fix) until ``migrate_checkpoint`` has rewritten its config; then it loads exactly.
"""

from __future__ import annotations

import json
import types

import pytest
import torch
from _patch_tiny import SEQ, VOCAB, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from hf_gradext.errors import UserFacingError
from hf_gradext.models import load_model
from hf_gradext.patches import (
    GradExtGPT2LMHeadModel,
    apply_from_args,
    apply_gradext_to_gpt2,
    check_not_legacy_checkpoint,
    migrate_checkpoint,
)

IDS = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def legacy_dir(tmp_path):
    """A patched checkpoint whose config.json is what hf_gradext <= 0.1 wrote; returns (dir, logits)."""
    model = apply_gradext_to_gpt2(model=tiny_model(), rms_norm=True, swiglu=True, causal_mask_cache=False)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path)
    file = tmp_path / "config.json"
    config = json.loads(file.read_text())
    config["model_type"], config["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    file.write_text(json.dumps(config))
    return tmp_path, logits


def _args(path):
    return types.SimpleNamespace(
        model_name_or_path=str(path),
        config_name=None,
        config_overrides=None,
        use_peft=False,
        gpt2_causal_mask_cache=False,
        gpt2_rms_norm=False,
        gpt2_swiglu=False,
        swiglu_hidden_size=None,
    )


def test_stock_transformers_would_load_it_silently_wrong(legacy_dir):
    """Why the refusal exists: plain from_pretrained builds stock GPT-2 and drops the SwiGLU weights."""
    path, logits = legacy_dir
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(model).__name__ == "GPT2LMHeadModel"
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=IDS).logits, logits, atol=1e-3)


def test_hf_gradext_refuses_a_legacy_checkpoint_with_the_fix(legacy_dir):
    path, _ = legacy_dir
    with pytest.raises(UserFacingError) as info:
        load_model(_args(path), tokenizer=None)
    message = str(info.value)
    assert "\n" not in message and "migrate_checkpoint" in message and str(path) in message
    with pytest.raises(UserFacingError, match="migrate_checkpoint"):
        check_not_legacy_checkpoint(path)
    with pytest.raises(UserFacingError, match="migrate_checkpoint"):
        apply_from_args(_args(path), AutoModelForCausalLM.from_pretrained(path))


def test_migration_makes_it_load_exactly(legacy_dir):
    path, logits = legacy_dir
    assert migrate_checkpoint(path) is True
    saved = json.loads((path / "config.json").read_text())
    assert saved["model_type"] == "gpt2_gradext" and saved["architectures"] == ["GradExtGPT2LMHeadModel"]
    assert not list(path.glob(".config.json.*"))  # no temp file left behind
    assert migrate_checkpoint(path) is False  # idempotent
    model = load_model(_args(path), tokenizer=None).eval()
    assert type(model) is GradExtGPT2LMHeadModel
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, logits)


def test_stock_and_current_checkpoints_pass(tmp_path):
    tiny_model().save_pretrained(tmp_path / "stock")
    apply_gradext_to_gpt2(model=tiny_model(), swiglu=True).save_pretrained(tmp_path / "patched")
    for name in ("stock", "patched"):
        check_not_legacy_checkpoint(tmp_path / name)
        check_not_legacy_checkpoint(AutoConfig.from_pretrained(tmp_path / name))
        assert migrate_checkpoint(tmp_path / name) is False
    check_not_legacy_checkpoint("some-org/not-a-local-dir")  # Hub ids are not ours to read here


def test_migration_errors_name_the_problem(tmp_path, legacy_dir):
    with pytest.raises(UserFacingError, match="no config.json"):
        migrate_checkpoint(tmp_path / "nowhere")
    path, _ = legacy_dir
    file = path / "config.json"
    config = json.loads(file.read_text())
    config["architectures"] = ["GPT2ForSequenceClassification"]
    file.write_text(json.dumps(config))
    with pytest.raises(UserFacingError, match="cannot migrate architecture GPT2ForSequenceClassification"):
        migrate_checkpoint(path)
