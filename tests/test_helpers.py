"""The shared test helpers are themselves checked, since every other test trusts them."""

import torch

from tests.helpers import logged_losses, make_ragged_batch, make_tiny_gpt2


def test_make_tiny_gpt2_is_deterministic_and_tied():
    a, b = make_tiny_gpt2(seed=3), make_tiny_gpt2(seed=3)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name
    assert a.lm_head.weight is a.transformer.wte.weight
    untied = make_tiny_gpt2(tie=False)
    assert untied.lm_head.weight is not untied.transformer.wte.weight


def test_make_ragged_batch_padding_contract():
    batch = make_ragged_batch(batch_size=3, seq_len=6, lengths=[6, 4, 2], pad_id=0)
    assert all(t.shape == (3, 6) for t in batch.values())
    assert batch["attention_mask"].sum(1).tolist() == [6, 4, 2]
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == -100).all() and (batch["input_ids"][pad] == 0).all()
    assert (batch["labels"][~pad] == batch["input_ids"][~pad]).all()
    assert batch["position_ids"][1].tolist() == list(range(6))


def test_logged_losses():
    assert logged_losses([{"loss": 2.0}, {"eval_loss": 1.0}, {"loss": 1.5}]) == [2.0, 1.5]


def test_make_tiny_gpt2_options():
    plain = make_tiny_gpt2(seed=1)
    model = make_tiny_gpt2(seed=1, dtype=torch.float64, perturb=0.1, training=False, dropout=0.2)
    assert model.dtype == torch.float64 and not model.training and model.config.attn_pdrop == 0.2
    ref = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        moved = not torch.equal(p.float(), ref[name])
        # perturb touches exactly the biases and LayerNorm params; the weights are the same seeded draw
        assert moved == (name.endswith("bias") or ".ln_" in name), name


def test_make_ragged_batch_options():
    batch = make_ragged_batch(
        lengths=(5, 3), seed=2, min_token=0, prompt=2, position_ids=False, example_id_start=7
    )
    assert list(batch) == ["input_ids", "attention_mask", "labels", "example_id"]
    assert batch["input_ids"].shape == (2, 5) and batch["example_id"].tolist() == [7, 8]
    assert (batch["labels"][:, :2] == -100).all() and batch["labels"][0, 2:].ne(-100).all()
    assert (batch["labels"][1, 3:] == -100).all() and (batch["input_ids"][1, 3:] == 0).all()
