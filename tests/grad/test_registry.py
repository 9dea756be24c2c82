from __future__ import annotations

import torch
from torch import nn

from hf_gradext.grad.registry import lookup, register_layer_math


class MyLinear(nn.Linear):
    pass


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))


def test_lookup_by_type_subclass_name_and_missing():
    assert lookup(nn.Linear(2, 3)).family == "linear"
    assert lookup(MyLinear(2, 3)).family == "linear"  # MRO walk
    assert lookup(nn.Embedding(4, 2)).family == "embedding"
    assert lookup(nn.RMSNorm(3)).family == "norm"
    assert lookup(Custom()) is None


def test_register_new_family():
    class Scaler(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

    @register_layer_math(Scaler, family="scaler")
    def scaler_math(module, a, g):
        return {}

    assert lookup(Scaler()).math is scaler_math
