import types

import pytest
import torch

from hf_gradext.errors import UserFacingError
from hf_gradext.models import build_config, load_model, max_positions, resolve_block_size, wrap_lora
from tests.helpers import make_tiny_gpt2


def ns(**kw):
    base = {"model_name_or_path": None, "config_name": "tiny", "config_overrides": None, "use_peft": False}
    base.update(kw)
    return types.SimpleNamespace(**base)


def lora_ns(**kw):
    base = {
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "lora_target_modules": None,
        "lora_modules_to_save": None,
    }
    base.update(kw)
    return ns(use_peft=True, **base)


def n_params_on_meta(config):
    from transformers import GPT2LMHeadModel

    with torch.device("meta"):
        return GPT2LMHeadModel(config).num_parameters()


def test_builtin_config_takes_vocab_and_special_ids_from_tokenizer(tiny_tokenizer):
    config = build_config(ns(), tiny_tokenizer)
    assert config.model_type == "gpt2"
    assert config.vocab_size == len(tiny_tokenizer)
    assert config.eos_token_id == tiny_tokenizer.eos_token_id
    assert config.pad_token_id == tiny_tokenizer.pad_token_id


def test_builtin_sizes_match_openai_gpt2_parameter_counts():
    # GPT-2 small / medium with the GPT-2 vocabulary: 124,439,808 and 354,823,168 parameters.
    for size, expected in (("small", 124_439_808), ("medium", 354_823_168)):
        config = build_config(ns(config_name=size), None)
        config.vocab_size = 50257
        assert n_params_on_meta(config) == expected


def test_config_overrides(tiny_tokenizer):
    config = build_config(ns(config_overrides="n_layer=1,resid_pdrop=0.0"), tiny_tokenizer)
    assert config.n_layer == 1 and config.resid_pdrop == 0.0
    with pytest.raises(UserFacingError, match="--config_overrides"):
        build_config(ns(config_overrides="n_layer"), tiny_tokenizer)


def test_config_from_local_dir_and_missing_hub_id(saved_model_dir):
    assert build_config(ns(config_name=str(saved_model_dir))).n_positions == 128
    with pytest.raises(UserFacingError, match="--config_name 'no-such-org/cfg'") as info:
        build_config(ns(config_name="no-such-org/cfg"))
    assert "\n" not in str(info.value)


def test_block_size_resolution(tiny_tokenizer):
    config = make_tiny_gpt2(n_positions=64).config
    assert max_positions(config) == 64
    assert resolve_block_size(ns(block_size=None), tiny_tokenizer, config) == 64
    assert resolve_block_size(ns(block_size=32), tiny_tokenizer, config) == 32
    with pytest.raises(UserFacingError, match="--block_size 65 exceeds the model's 64 positions"):
        resolve_block_size(ns(block_size=65), tiny_tokenizer, config)


def test_load_pretrained_from_local_dir(saved_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    args = ns(model_name_or_path=str(saved_model_dir), config_name=None, model_dtype=None)
    model = load_model(args, tiny_tokenizer)
    ref = AutoModelForCausalLM.from_pretrained(saved_model_dir)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), name
    half = load_model(
        ns(model_name_or_path=str(saved_model_dir), config_name=None, model_dtype="bfloat16"), tiny_tokenizer
    )
    assert next(half.parameters()).dtype == torch.bfloat16


def test_unfetchable_hub_model_is_one_line_error(tiny_tokenizer):
    args = ns(model_name_or_path="no-such-org/no-such-model", config_name=None, model_dtype=None)
    with pytest.raises(UserFacingError) as info:
        load_model(args, tiny_tokenizer, config=make_tiny_gpt2().config)
    msg = str(info.value)
    assert "\n" not in msg and "'no-such-org/no-such-model'" in msg and "local directory" in msg


def test_embeddings_grow_to_the_tokenizer(tiny_tokenizer):
    config = build_config(ns(config_overrides="n_layer=1,n_embd=32,n_head=2"), tiny_tokenizer)
    config.vocab_size = 100  # smaller than the tokenizer
    model = load_model(ns(), tiny_tokenizer, config)
    assert model.get_input_embeddings().weight.shape[0] == len(tiny_tokenizer)


def test_patches_run_before_lora(monkeypatch, tiny_tokenizer):
    import hf_gradext.patches as patches

    seen = []
    monkeypatch.setattr(
        patches, "apply_from_args", lambda args, model: seen.append(type(model).__name__) or model
    )
    config = build_config(ns(config_overrides="n_layer=1,n_embd=32,n_head=2"), tiny_tokenizer)
    model = load_model(lora_ns(), tiny_tokenizer, config)
    assert seen == ["GPT2LMHeadModel"]
    assert type(model).__name__.startswith("Peft")


def test_lora_trains_only_adapters():
    model = wrap_lora(lora_ns(), make_tiny_gpt2())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("c_attn" in n for n in trainable)  # peft's GPT-2 default target
    with pytest.raises(UserFacingError, match="--lora_target_modules"):
        wrap_lora(lora_ns(lora_target_modules=["no_such_module"]), make_tiny_gpt2())


def test_missing_local_folder_is_not_a_hub_failure(tmp_path, tiny_tokenizer):
    for name in ("./nonexistent", str(tmp_path / "nope")):
        with pytest.raises(UserFacingError) as info:
            load_model(ns(model_name_or_path=name, config_name=None, model_dtype=None), tiny_tokenizer)
        msg = str(info.value)
        assert msg.startswith(f"--model_name_or_path {name!r}: no such local directory"), msg
        assert "unreachable" not in msg and "cache" not in msg
    with pytest.raises(UserFacingError, match="^--config_name '/tmp/no/such/cfg': no such local directory"):
        build_config(ns(config_name="/tmp/no/such/cfg"))


def test_offline_uncached_hub_id_says_it_is_not_in_the_cache(tmp_path, tiny_tokenizer):
    # The suite runs with HF_HUB_OFFLINE=1 (conftest): nothing is probed, the cache is all there is.
    args = ns(model_name_or_path="some-org/uncached", config_name=None, cache_dir=str(tmp_path))
    with pytest.raises(UserFacingError) as info:
        build_config(args, tiny_tokenizer)
    msg = str(info.value)
    assert "\n" not in msg and "--model_name_or_path 'some-org/uncached'" in msg
    assert f"not in the local cache ({tmp_path})" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "local directory" in msg


def test_cached_hub_id_loads_offline(tmp_path, saved_model_dir, tiny_tokenizer):
    from hf_gradext.data import load_tokenizer
    from tests.helpers import write_hub_cache

    write_hub_cache(tmp_path, "some-org/cached-tiny", saved_model_dir)
    args = ns(
        model_name_or_path="some-org/cached-tiny", config_name=None, model_dtype=None, cache_dir=str(tmp_path)
    )
    tokenizer = load_tokenizer(args)
    config = build_config(args, tokenizer)
    assert config.n_positions == 128 and tokenizer.get_vocab() == tiny_tokenizer.get_vocab()
    model = load_model(args, tokenizer, config)
    assert model.num_parameters() > 0
