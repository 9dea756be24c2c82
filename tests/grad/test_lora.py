from __future__ import annotations

from torch import nn

from hf_gradext.grad.lora import is_lora_adapter, is_peft_model


def test_is_lora_adapter_by_name_and_type():
    lin = nn.Linear(2, 2)
    assert is_lora_adapter("base_model.model.h.0.attn.c_attn.lora_A.default", lin)
    assert is_lora_adapter("x.lora_B.default", lin)
    assert not is_lora_adapter("x.c_attn.base_layer", lin)
    assert not is_lora_adapter("x.lora_A.default", nn.Embedding(2, 2))
    assert not is_peft_model(lin)
