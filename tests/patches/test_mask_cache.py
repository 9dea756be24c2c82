"""The cached causal mask gives exactly transformers' outputs, with fewer host-device syncs."""

from __future__ import annotations

import pytest
import torch
from _patch_tiny import SEQ, VOCAB, tiny_model

from hf_gradext.patches import mask_cache
from hf_gradext.patches.sync_count import HostSyncCounter

IDS = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(0))
PAD_LEFT = torch.ones(3, SEQ, dtype=torch.long)
PAD_LEFT[1, :5] = 0
PAD_RIGHT = torch.ones(3, SEQ, dtype=torch.long)
PAD_RIGHT[2, 11:] = 0
MASKS = {"none": None, "all_ones": torch.ones(3, SEQ, dtype=torch.long), "left": PAD_LEFT, "right": PAD_RIGHT}


def _run(model, mask, cached: bool):
    """Logits, summed-loss gradients of every parameter, and the host syncs of the forward."""
    (mask_cache.install_mask_cache if cached else mask_cache.uninstall_mask_cache)()
    model.zero_grad()
    with HostSyncCounter() as counter:
        out = model(input_ids=IDS, attention_mask=mask)
    logits = out.logits
    weights = mask if mask is not None else torch.ones_like(IDS)
    (logits.float().pow(2).mean(-1) * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return logits.detach(), grads, counter.count


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_cached_outputs_and_grads_equal_stock(attn, mask_name):
    model = tiny_model(attn=attn).train()  # dropout 0: train mode is deterministic
    mask = MASKS[mask_name]
    stock_logits, stock_grads, _ = _run(model, mask, cached=False)
    logits, grads, _ = _run(model, mask, cached=True)
    valid = (mask if mask is not None else torch.ones_like(IDS)).bool()
    # Rows that are padding queries are garbage in both; HF makes them identical too, compare all.
    assert torch.equal(logits[valid], stock_logits[valid])
    assert torch.equal(logits, stock_logits)
    for name, grad in grads.items():
        assert torch.equal(grad, stock_grads[name]), name


@pytest.mark.parametrize(
    ("attn", "mask_name", "stock_syncs", "cached_syncs"),
    [
        ("eager", "none", 1, 0),  # HF: packed-sequence detection
        ("sdpa", "none", 1, 0),
        ("eager", "all_ones", 0, 0),  # HF eager never syncs; the cache keeps it so
        ("sdpa", "all_ones", 1, 1),  # the one read that picks sdpa's is_causal path
        ("sdpa", "left", 2, 1),
    ],
)
def test_host_syncs_removed(attn, mask_name, stock_syncs, cached_syncs):
    model = tiny_model(attn=attn).eval()
    assert _run(model, MASKS[mask_name], cached=False)[2] == stock_syncs
    assert _run(model, MASKS[mask_name], cached=True)[2] == cached_syncs


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_never_reused_across_padding(attn):
    """Alternating paddings at the same (T, dtype, device) must each get their own mask."""
    model = tiny_model(attn=attn).eval()
    sequence = ["left", "right", "all_ones", "none", "left", "none", "right"]
    with torch.no_grad():
        mask_cache.uninstall_mask_cache()
        stock = [model(input_ids=IDS, attention_mask=MASKS[k]).logits for k in sequence]
        mask_cache.install_mask_cache()
        cached = [model(input_ids=IDS, attention_mask=MASKS[k]).logits for k in sequence]
    for name, a, b in zip(sequence, stock, cached):
        assert torch.equal(a, b), name
    assert mask_cache.mask_cache_info()["hits"] > 0


def test_user_position_ids_fall_back_to_transformers():
    """Packed sequences (positions restart mid-row) need HF's packed mask: the cache must not claim them."""
    model = tiny_model(attn="sdpa").eval()
    positions = torch.cat([torch.arange(6), torch.arange(SEQ - 6)]).expand(3, SEQ)
    with torch.no_grad():
        stock = model(input_ids=IDS, position_ids=positions).logits
        mask_cache.install_mask_cache()
        cached = model(input_ids=IDS, position_ids=positions).logits
    assert torch.equal(stock, cached)
    assert mask_cache.mask_cache_info()["fallbacks"] >= 1


def test_generation_with_kv_cache_unchanged():
    model = tiny_model(attn="eager").eval()
    prompt = IDS[:1, :5]
    kw = {"max_new_tokens": 6, "do_sample": False, "use_cache": True, "pad_token_id": 0}
    stock = model.generate(prompt, **kw)
    mask_cache.install_mask_cache()
    assert torch.equal(model.generate(prompt, **kw), stock)


def test_cache_built_in_inference_mode_is_usable_for_training():
    model = tiny_model(attn="sdpa")
    mask_cache.install_mask_cache()
    with torch.inference_mode():
        model.eval()(input_ids=IDS)
    model.train()(input_ids=IDS, labels=IDS).loss.backward()  # would fail on an inference tensor
    assert model.transformer.wpe.weight.grad is not None


def test_bounded_and_clearable():
    mask_cache.install_mask_cache()
    model = tiny_model(attn="eager").eval()
    with torch.no_grad():
        for seq_len in range(1, 2 * SEQ + 1):
            model(input_ids=IDS[:2, :1].repeat(1, seq_len))
    info = mask_cache.mask_cache_info()
    assert info["entries"] == mask_cache.MAX_ENTRIES
    mask_cache.clear_mask_cache()
    assert mask_cache.mask_cache_info()["entries"] == 0


def test_install_uninstall_restores_transformers():
    from transformers.models.gpt2 import modeling_gpt2

    original_forward = modeling_gpt2.GPT2Model.forward
    original_mask = modeling_gpt2.create_causal_mask
    mask_cache.install_mask_cache()
    mask_cache.install_mask_cache()  # idempotent: no double wrapping
    assert modeling_gpt2.create_causal_mask is mask_cache.cached_create_causal_mask
    assert modeling_gpt2.GPT2Model.forward.__wrapped__ is original_forward
    mask_cache.uninstall_mask_cache()
    assert modeling_gpt2.GPT2Model.forward is original_forward
    assert modeling_gpt2.create_causal_mask is original_mask
