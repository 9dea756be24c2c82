"""The patched tiny GPT-2 learns the embedded corpus at least as well as stock GPT-2 over the same steps."""

from __future__ import annotations

import torch
from _patch_tiny import tiny_config
from transformers import GPT2LMHeadModel

from hf_gradext.patches import apply_gradext_to_gpt2

STEPS, BATCH, SEQ_LEN = 60, 8, 32


def _blocks() -> tuple[torch.Tensor, int]:
    from hf_gradext.data.corpus import embedded_corpus_text
    from hf_gradext.data.tokenizer import build_embedded_tokenizer

    tokenizer = build_embedded_tokenizer()
    ids = torch.tensor(tokenizer(embedded_corpus_text()[:120_000])["input_ids"])
    n = ids.numel() // SEQ_LEN
    return ids[: n * SEQ_LEN].view(n, SEQ_LEN), len(tokenizer)


def _final_loss(blocks: torch.Tensor, vocab: int, patched: bool) -> float:
    apply_gradext_to_gpt2(rms_norm=patched, swiglu=patched)
    config = tiny_config()
    config.vocab_size = vocab
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).train()
    order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(STEPS):
        idx = order[(step * BATCH) % len(order) :][:BATCH]
        batch = blocks[idx]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-10:]) / 10  # mean of the last 10 steps: less sensitive to one batch


def test_patched_reaches_a_loss_at_least_as_low_as_stock():
    blocks, vocab = _blocks()
    stock = _final_loss(blocks, vocab, patched=False)
    patched = _final_loss(blocks, vocab, patched=True)
    print(f"stock {stock:.4f}  rms_norm+swiglu {patched:.4f}")
    assert patched <= stock
