from __future__ import annotations

import pytest
from _grad_helpers import tiny_gpt2
from torch import nn

from hf_gradext.errors import UserFacingError
from hf_gradext.grad.selection import clean_name, select_modules, unwrap_model


def test_groups_on_gpt2():
    model = tiny_gpt2()
    assert set(select_modules(model, "embed")) == {"transformer.wte", "transformer.wpe"}
    norms = select_modules(model, "norm")
    assert len(norms) == 5 and all(".ln_" in n for n in norms)
    attn = select_modules(model, "attn")
    assert set(attn) == {f"transformer.h.{i}.attn.{c}" for i in (0, 1) for c in ("c_attn", "c_proj")}
    assert set(select_modules(model, "mlp")) == {
        f"transformer.h.{i}.mlp.{c}" for i in (0, 1) for c in ("c_fc", "c_proj")
    }
    everything = select_modules(model, "all")
    assert "lm_head" in everything and len(everything) == 2 + 5 + 4 + 4 + 1
    assert list(everything) == [n for n, _ in model.named_modules() if n in everything]  # model order


def test_comma_lists_and_regexes():
    model = tiny_gpt2()
    got = select_modules(model, r"embed, h\.1\.attn\.c_attn")
    assert set(got) == {"transformer.wte", "transformer.wpe", "transformer.h.1.attn.c_attn"}
    assert set(select_modules(model, ["norm", "lm_head"])) >= {"lm_head", "transformer.ln_f"}


def test_no_match_lists_what_exists():
    with pytest.raises(UserFacingError, match=r"matches no module; groups: all=16.*transformer\.wte"):
        select_modules(tiny_gpt2(), "decoder")
    with pytest.raises(UserFacingError, match="not a valid regex"):
        select_modules(tiny_gpt2(), "h.(")
    with pytest.raises(UserFacingError, match="empty"):
        select_modules(tiny_gpt2(), " , ")


def test_frozen_modules_are_not_candidates():
    model = tiny_gpt2()
    for p in model.transformer.h[0].parameters():
        p.requires_grad_(False)
    assert not any(n.startswith("transformer.h.0.") for n in select_modules(model))
    with pytest.raises(UserFacingError, match="no trainable"):
        select_modules(nn.Linear(2, 2).requires_grad_(False))


def test_unwrap_and_clean_names():
    class DistributedDataParallel(nn.Module):  # stands in for the wrapper (matched by class name)
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    inner = tiny_gpt2()
    assert unwrap_model(DistributedDataParallel(inner)) is inner
    assert set(select_modules(DistributedDataParallel(inner), "embed")) == {
        "transformer.wte",
        "transformer.wpe",
    }
    assert clean_name("_fsdp_wrapped_module.transformer._checkpoint_wrapped_module.h.0") == "transformer.h.0"
