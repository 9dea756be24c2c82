"""Gradient-norm helpers of the GQC loop, against plain torch."""

from __future__ import annotations

import math

import torch

from hf_gradext.gqc.norms import MicrobatchNormTracker, grads_of, scale_, total_norm


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def test_tracker_sees_each_backward_own_gradient_not_the_running_sum():
    model = _model()
    params = list(model.parameters())
    tracker = MicrobatchNormTracker(params)
    xs = [torch.randn(5, 4), torch.randn(5, 4)]
    own = []
    for x in xs:
        ref = torch.autograd.grad(model(x).pow(2).sum(), params)  # this microbatch alone
        own.append(math.sqrt(sum(float(g.pow(2).sum()) for g in ref)))
    tracker.pop()  # the reference gradients went through the hooks too
    for x, expected in zip(xs, own, strict=True):
        model(x).pow(2).sum().backward()  # accumulates into .grad
        value = tracker.pop_tensor()
        assert isinstance(value, torch.Tensor)  # stays on the device until the loop's one host read
        assert abs(float(value) - expected) < 1e-5 * expected
    accumulated = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params))
    assert abs(accumulated - own[1]) > 1e-3  # the running sum differs: the tracker did not report it
    assert tracker.pop() == 0.0  # reset after each pop
    tracker.remove()
    model(xs[0]).sum().backward()
    assert tracker.pop() == 0.0  # no hooks any more


def test_total_norm_grads_of_and_scale():
    model = _model()
    model(torch.randn(3, 4)).sum().backward()
    grads = grads_of(list(model.parameters()))
    expected = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    assert abs(float(total_norm(grads)) - expected) < 1e-6
    scale_(grads, 0.5)
    assert abs(float(total_norm(grads)) - expected / 2) < 1e-6
