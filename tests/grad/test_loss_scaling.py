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


def test_shifts_labels_and_resolve():
    model = tiny_gpt2()
    assert shifts_labels(model) and not shifts_labels(nn.Linear(2, 2))
    assert resolve_scale(None, model) is None
    assert isinstance(resolve_scale(ragged_batch(), model), LossScale)
