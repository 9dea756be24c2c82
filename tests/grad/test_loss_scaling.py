from __future__ import annotations

import torch
from _grad_helpers import ragged_batch, tiny_gpt2
from torch import nn

from hf_gradext.grad.loss_scaling import LossScale, resolve_scale, shifts_labels, valid_token_counts


def test_valid_token_counts_shift():
    labels = torch.tensor([[1, 2, -100, 4], [-100, -100, -100, 5]])
    assert valid_token_counts(labels).tolist() == [2, 1]
    assert valid_token_counts(labels, shift=False).tolist() == [3, 1]


def test_from_token_sum_and_zero_count():
    s = LossScale.from_token_sum(torch.tensor([2, 0, 5]), 0.1)
    assert torch.allclose(s.sample_scale, torch.tensor([5.0, 0.0, 2.0], dtype=torch.float64))


def test_batch_mean_and_hf_window_and_row_scale():
    batch = ragged_batch(lengths=(5, 3), prompt=1)  # n_i = 4, 2 after shift+prompt
    s = LossScale.batch_mean(batch)
    assert torch.allclose(s.sample_scale, torch.tensor([6 / 4, 6 / 2], dtype=torch.float64))
    w = LossScale.hf_window(batch, 30, loss_multiplier=2.0)
    assert torch.allclose(w.sample_scale, torch.tensor([30 / 8, 30 / 4], dtype=torch.float64))
    rows = s.row_scale(2, 5, torch.device("cpu"), torch.float32)  # (B, T, 1): padding zeroed
    assert rows.shape == (2, 5, 1) and rows[1, 3:].abs().sum() == 0 and rows[1, 0, 0] == 3.0


def test_scale_never_reads_device_values_on_the_host():
    # Meta tensors have no data: any host read (.item(), float(), .cpu(), .tolist()) would raise, just as
    # on a GPU it would block the CPU until the GPU caught up. Arming a capture must do neither.
    meta = torch.device("meta")
    labels = torch.zeros(3, 6, dtype=torch.long, device=meta)
    batch = {"labels": labels, "attention_mask": torch.ones(3, 6, dtype=torch.long, device=meta)}
    for scale in (
        LossScale.batch_mean(batch),
        LossScale.hf_window(batch, torch.tensor(40, device=meta), loss_multiplier=2.0),
        LossScale.from_token_sum(valid_token_counts(labels), torch.tensor(0.5, device=meta)),
    ):
        assert scale.sample_scale.device == meta and scale.sample_scale.dtype == torch.float64
        assert scale.row_scale(3, 6, meta, torch.bfloat16).shape in ((3, 6, 1), (3, 1, 1))


def test_int_item_counts_keep_float64_precision():
    # 1/3 in float32 would be off by ~1e-8 relative; the float64 oracle tests need ~1e-16.
    w = LossScale.hf_window({"labels": torch.tensor([[1, 2, 3, 4]])}, torch.tensor(3), loss_multiplier=1.0)
    assert w.sample_scale.item() == 3 / 3 * (1.0)
    m = LossScale.batch_mean({"labels": torch.tensor([[1, 2, 3, 4], [1, 2, -100, -100]])})
    assert m.sample_scale.tolist() == [4 / 3, 4 / 1]


def test_shifts_labels_and_resolve():
    model = tiny_gpt2()
    assert shifts_labels(model) and not shifts_labels(nn.Linear(2, 2))
    assert resolve_scale(None, model) is None
    assert isinstance(resolve_scale(ragged_batch(), model), LossScale)


def test_shift_is_the_package_one_answer_and_resolve_follows_it():
    from transformers.loss.loss_utils import ForMaskedLMLoss

    from hf_gradext.integrations import loss as loss_integration

    assert shifts_labels is loss_integration.shifts_labels
    batch = ragged_batch(lengths=(5, 3), prompt=0)  # position 0 supervised: shifting changes the counts
    model = tiny_gpt2()
    shifted = resolve_scale(batch, model).sample_scale
    model.loss_function = ForMaskedLMLoss  # the model's own loss no longer shifts: neither do the counts
    plain = resolve_scale(batch, model).sample_scale
    assert torch.equal(shifted, LossScale.batch_mean(batch, shift=True).sample_scale)
    assert torch.equal(plain, LossScale.batch_mean(batch, shift=False).sample_scale)
    assert not torch.equal(shifted, plain)
