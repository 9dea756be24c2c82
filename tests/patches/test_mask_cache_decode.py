"""The mask cache under KV-cache decoding (by hand, under either cache name, and ``generate``), and
per-model isolation: a model that did not ask for the cache never reaches it."""

from __future__ import annotations

import inspect

import pytest
import torch
from _patch_tiny import SEQ, VOCAB, tiny_model
from transformers import DynamicCache
from transformers.models.gpt2 import modeling_gpt2

from hf_gradext.patches import apply_gradext_to_gpt2, mask_cache

CACHE_NAME = [n for n in inspect.signature(modeling_gpt2.GPT2Model.forward).parameters][
    2
]  # after self, input_ids
IDS = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


def _decode_by_hand(model, how: str, steps: int = 5) -> torch.Tensor:
    """Greedy decode with a KV cache passed as ``how`` (a keyword name, or 'positional')."""
    prompt = IDS[:, :6]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True, **{CACHE_NAME: cache})
        logits = [out.logits[:, -1]]
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            if how == "positional":
                out = model.transformer(token, cache, use_cache=True)
                step = model.lm_head(out.last_hidden_state)
            else:
                step = model(input_ids=token, use_cache=True, **{how: cache}).logits
            logits.append(step[:, -1])
            token = step[:, -1:].argmax(-1)
    return torch.stack(logits, 1)


HOW = ["positional", CACHE_NAME] + (["past_key_values"] if CACHE_NAME == "cache" else [])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("how", HOW)
def test_decode_by_hand_equals_stock(attn, how):
    model = tiny_model(attn=attn).eval()
    stock = _decode_by_hand(model, how)
    apply_gradext_to_gpt2(model=model)
    assert torch.equal(_decode_by_hand(model, how), stock)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("left_pad", [False, True])
def test_generate_equals_stock(attn, left_pad):
    model = tiny_model(attn=attn).eval()
    ids = IDS[:, :8]
    mask = torch.ones_like(ids)
    if left_pad:
        mask[0, :3] = 0
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=mask)
    stock = model.generate(ids, output_scores=True, return_dict_in_generate=True, **kwargs)
    apply_gradext_to_gpt2(model=model)
    cached = model.generate(ids, output_scores=True, return_dict_in_generate=True, **kwargs)
    assert torch.equal(cached.sequences, stock.sequences)
    for a, b in zip(cached.scores, stock.scores):
        assert torch.equal(a, b)


def test_a_patched_model_leaves_other_models_alone():
    patched, other = tiny_model(attn="eager").eval(), tiny_model(attn="eager").eval()
    stock = other(input_ids=IDS).logits
    apply_gradext_to_gpt2(model=patched)
    mask_cache.clear_mask_cache()
    out = other(input_ids=IDS).logits
    info = mask_cache.mask_cache_info()
    assert info["hits"] == info["misses"] == info["fallbacks"] == 0 and info["entries"] == 0
    assert torch.equal(out, stock)
    patched(input_ids=IDS)
    assert mask_cache.mask_cache_info()["misses"] + mask_cache.mask_cache_info()["hits"] > 0


def test_model_level_off_keeps_the_class_default_for_others():
    a, b = tiny_model(attn="eager").eval(), tiny_model(attn="eager").eval()
    apply_gradext_to_gpt2(model=a)
    apply_gradext_to_gpt2(model=b, causal_mask_cache=False)
    assert mask_cache.is_mask_cache_installed()
    assert mask_cache.wants_mask_cache(a.config) and not mask_cache.wants_mask_cache(b.config)


def test_uninstall_restores_transformers_functions():
    original_fn, original_forward = modeling_gpt2.create_causal_mask, modeling_gpt2.GPT2Model.forward
    mask_cache.install_mask_cache()
    assert modeling_gpt2.create_causal_mask is not original_fn
    mask_cache.uninstall_mask_cache()
    assert modeling_gpt2.create_causal_mask is original_fn
    assert modeling_gpt2.GPT2Model.forward is original_forward
