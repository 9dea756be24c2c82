"""apply_gradext_to_gpt2: construction, config round trip, warnings, checkpointing, peft, per-sample grads."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from _patch_tiny import SEQ, VOCAB, tiny_config, tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from hf_gradext.errors import UserFacingError
from hf_gradext.patches import (
    GPT2GradExtConfig,
    GradExtGPT2LMHeadModel,
    GradExtGPT2Model,
    apply_gradext_to_gpt2,
)
from hf_gradext.patches.rms_norm import GradExtRMSNorm
from hf_gradext.patches.swiglu import GradExtSwiGLUMLP

IDS = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))


def _kinds(model):
    t = model.transformer
    return type(t.h[0].ln_1), type(t.h[1].ln_2), type(t.ln_f), type(t.h[0].mlp)


def test_class_level_patch_builds_patched_models_and_records_config():
    apply_gradext_to_gpt2(rms_norm=True, swiglu=True)
    model = tiny_model()
    assert _kinds(model) == (GradExtRMSNorm, GradExtRMSNorm, GradExtRMSNorm, GradExtSwiGLUMLP)
    assert type(model) is GradExtGPT2LMHeadModel and type(model.transformer) is GradExtGPT2Model
    assert type(model.config) is GPT2GradExtConfig and model.config.model_type == "gpt2_gradext"
    assert model.config.gradext_rms_norm and model.config.gradext_swiglu
    assert model.config.gradext_swiglu_hidden_size == 128  # round(8 * 48 / 3)
    # GPT-2 init scheme: unit norm scales, residual-scaled down projection.
    assert torch.equal(model.transformer.ln_f.weight, torch.ones(48))
    down = torch.cat([b.mlp.down_proj.weight.flatten() for b in model.transformer.h])
    up = torch.cat([b.mlp.up_proj.weight.flatten() for b in model.transformer.h])
    assert abs(down.std().item() - 0.02 / 2) < 0.002 and abs(up.std().item() - 0.02) < 0.002


def test_stock_config_builds_stock_gpt2():
    model = tiny_model()
    assert type(model) is GPT2LMHeadModel and type(model.config) is GPT2Config
    assert _kinds(model)[2:] == (torch.nn.LayerNorm, type(model.transformer.h[0].mlp))
    assert not hasattr(model.config, "gradext_rms_norm")
    assert "gradext" not in json.dumps(model.config.to_diff_dict())


def test_import_changes_no_transformers_class():
    """`import hf_gradext` adds Auto-registry entries only: every transformers class is as it was."""
    script = textwrap.dedent(
        """
        import transformers
        from transformers import modeling_utils, PreTrainedConfig
        from transformers.models.gpt2 import configuration_gpt2, modeling_gpt2

        def snapshot():
            classes = [modeling_utils.PreTrainedModel, PreTrainedConfig, configuration_gpt2.GPT2Config]
            classes += [v for v in vars(modeling_gpt2).values() if isinstance(v, type)]
            module_funcs = {k: id(v) for k, v in vars(modeling_gpt2).items()}
            return {c.__qualname__: {k: id(v) for k, v in vars(c).items()} for c in classes}, module_funcs

        before = snapshot()
        import hf_gradext  # noqa: F401
        after = snapshot()
        assert before == after, "import hf_gradext changed a transformers class"
        from transformers import AutoConfig
        assert type(AutoConfig.for_model("gpt2_gradext")).__name__ == "GPT2GradExtConfig"
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_patched_config_alone_rebuilds_the_architecture():
    config = GPT2GradExtConfig(
        **tiny_config().to_dict()
        | {"gradext_rms_norm": True, "gradext_swiglu": True, "gradext_swiglu_hidden_size": 40}
    )
    for model in (GradExtGPT2LMHeadModel(config), AutoModelForCausalLM.from_config(config)):
        assert type(model) is GradExtGPT2LMHeadModel
        assert isinstance(model.transformer.ln_f, GradExtRMSNorm)
        assert model.transformer.h[0].mlp.gate_proj.out_features == 40
        # Native GPT-2 init: residual-scaled attention and SwiGLU output projections, unit norm scales.
        std = 0.02 / (2 * 2) ** 0.5
        c_proj = torch.cat([b.attn.c_proj.weight.flatten() for b in model.transformer.h])
        down = torch.cat([b.mlp.down_proj.weight.flatten() for b in model.transformer.h])
        assert abs(c_proj.std().item() - std) < 0.002 and abs(down.std().item() - std) < 0.002
        assert torch.equal(model.transformer.ln_f.weight, torch.ones(48))


def test_stock_gpt2_class_with_gradext_keys_stays_stock():
    """Without a hook nothing reads gradext keys from a stock config: the model type decides."""
    model = GPT2LMHeadModel(tiny_config(gradext_rms_norm=True))
    assert isinstance(model.transformer.ln_f, torch.nn.LayerNorm)


def test_save_from_pretrained_round_trip_in_a_fresh_process(tmp_path):
    """Fresh-process semantics: only `import hf_gradext`, then AutoModelForCausalLM.from_pretrained."""
    model = tiny_model(attn="sdpa")  # what from_pretrained picks by default
    apply_gradext_to_gpt2(model=model, rms_norm=True, swiglu=True, swiglu_hidden_size=64)
    with torch.no_grad():  # make the norm scales non-trivial so a silent LayerNorm would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["gradext_rms_norm"] and saved["gradext_swiglu"] and saved["gradext_swiglu_hidden_size"] == 64
    assert saved["model_type"] == "gpt2_gradext" and saved["architectures"] == ["GradExtGPT2LMHeadModel"]
    torch.save(IDS, tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import torch
        import hf_gradext  # registers model_type gpt2_gradext with the Auto classes
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r}).eval()
        ids = torch.load({str(tmp_path / "ids.pt")!r}, weights_only=True)
        with torch.no_grad():
            save_file({{"logits": model(input_ids=ids).logits}}, {str(tmp_path / "logits.safetensors")!r})
        print(type(model.transformer.ln_f).__name__, type(model.transformer.h[0].mlp).__name__)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GradExtRMSNorm GradExtSwiGLUMLP" in done.stdout
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    assert torch.equal(load_file(tmp_path / "logits.safetensors")["logits"], expected)

    # Without hf_gradext no process can take it for stock GPT-2: transformers does not know the type.
    bare = (
        "from transformers import AutoModelForCausalLM; "
        f"AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r})"
    )
    done = subprocess.run([sys.executable, "-c", bare], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "gpt2_gradext" in done.stderr, done.stderr[-3000:]


def test_instance_level_patch_warns_with_new_and_dropped_weights(caplog):
    model = tiny_model()
    gammas = [model.transformer.h[0].ln_1.weight.detach().clone()]
    with caplog.at_level(logging.WARNING, logger="hf_gradext.patches.gpt2"):
        apply_gradext_to_gpt2(model=model, rms_norm=True, swiglu=True)
    text = caplog.text
    assert "6 new parameters" in text and "transformer.h.*.mlp.gate_proj.weight (x2)" in text
    assert "transformer.h.*.ln_1.bias (x2)" in text and "transformer.h.*.mlp.c_fc.weight (x2)" in text
    assert torch.equal(model.transformer.h[0].ln_1.weight, gammas[0])  # LayerNorm gamma reused
    assert model.config.gradext_swiglu_hidden_size == 128
    assert type(model) is GradExtGPT2LMHeadModel and model.config.model_type == "gpt2_gradext"
    down = torch.cat([b.mlp.down_proj.weight.flatten() for b in model.transformer.h])
    assert abs(down.std().item() - 0.01) < 0.002  # residual-scaled, as a freshly built patched model
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_gradext.patches.gpt2"):
        apply_gradext_to_gpt2(model=model, rms_norm=True, swiglu=True)  # already patched: no-op
    assert caplog.text == ""


def test_stock_checkpoint_loaded_with_class_level_patches_reports_new_weights(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    apply_gradext_to_gpt2(swiglu=True)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(model.transformer.h[0].mlp, GradExtSwiGLUMLP)
    assert "transformer.h.0.mlp.gate_proj.weight" in info["missing_keys"]
    assert "transformer.h.0.mlp.c_fc.weight" in info["unexpected_keys"]


def test_errors_name_the_problem():
    with pytest.raises(UserFacingError, match="--gpt2_swiglu"):
        apply_gradext_to_gpt2(swiglu_hidden_size=64)
    with pytest.raises(UserFacingError, match="positive integer"):
        apply_gradext_to_gpt2(swiglu=True, swiglu_hidden_size=0)
    model = tiny_model()
    apply_gradext_to_gpt2(model=model, swiglu=True)
    with pytest.raises(UserFacingError, match="already has SwiGLU width 128"):
        apply_gradext_to_gpt2(model=model, swiglu=True, swiglu_hidden_size=64)
    with pytest.raises(UserFacingError, match="'bert'"):
        apply_gradext_to_gpt2(model=_Bert())
    from transformers import GPT2ForSequenceClassification

    head = GPT2ForSequenceClassification(tiny_config(pad_token_id=0))
    with pytest.raises(UserFacingError, match="not GPT2ForSequenceClassification"):
        apply_gradext_to_gpt2(model=head, rms_norm=True)
    assert apply_gradext_to_gpt2(model=head) is head  # the mask cache alone is fine on any head
    assert type(head.config) is GPT2Config


class _Bert(torch.nn.Module):
    class config:  # noqa: N801 - mimics a HF config attribute
        model_type = "bert"


def test_activation_checkpointing_still_recomputes_blocks():
    apply_gradext_to_gpt2(rms_norm=True, swiglu=True)
    model = tiny_model().train()
    model.activation_checkpointing_enable()
    block = model.transformer.h[0]
    assert block.gradient_checkpointing
    calls = {"ln_1": 0, "mlp": 0}

    def counter(name):
        def hook(*_):
            calls[name] += 1

        return hook

    # transformers 5.23 checkpoints GPT2Block.forward (not __call__), so block-level hooks run once;
    # pre-hooks on the block's submodules see the recomputation (torch may stop it early, after the
    # last tensor backward needs, so count entries, not exits).
    block.ln_1.register_forward_pre_hook(counter("ln_1"))
    block.mlp.register_forward_pre_hook(counter("mlp"))
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert calls == {"ln_1": 2, "mlp": 2}  # forward + recompute in backward
    assert block.mlp.gate_proj.weight.grad is not None and block.ln_1.weight.grad is not None


def test_peft_lora_on_a_patched_model_trains():
    from peft import LoraConfig, get_peft_model

    apply_gradext_to_gpt2(rms_norm=True, swiglu=True)
    model = get_peft_model(
        tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"])
    )
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
    params = dict(model.named_parameters())
    assert any(not torch.equal(params[n], v) for n, v in trainable.items() if "lora_B" in n)
    assert all(torch.equal(params[n], v) for n, v in frozen.items())


def test_per_sample_gradients_on_a_patched_model():
    """The per-sample gradient engine handles GradExtRMSNorm and the SwiGLU Linears (loop oracle)."""
    grad = pytest.importorskip("hf_gradext.grad")
    apply_gradext_to_gpt2(rms_norm=True, swiglu=True)
    model = tiny_model().double()
    labels = IDS.clone()
    labels[1, :5] = -100
    batch = {"input_ids": IDS, "labels": labels}
    got = grad.per_sample_gradients(model, batch, layers="all", dtype=torch.float64)
    names = [
        "transformer.h.0.ln_1.weight",
        "transformer.ln_f.weight",
        "transformer.h.1.mlp.gate_proj.weight",
        "transformer.h.0.mlp.down_proj.weight",
    ]
    for i in range(IDS.shape[0]):
        model.zero_grad()
        model(input_ids=IDS[i : i + 1], labels=labels[i : i + 1]).loss.backward()
        params = dict(model.named_parameters())
        for name in names:
            # Same tolerance the stock model needs (batched vs single-sample float64 forward differ ~1e-7).
            torch.testing.assert_close(got[name][i], params[name].grad, rtol=1e-5, atol=1e-9)
