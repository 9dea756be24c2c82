"""hf_gradext.projection.blocks: the layout a projector builds, and the check of stored layouts."""

from __future__ import annotations

import pytest

from hf_gradext.errors import UserFacingError
from hf_gradext.grad.selection import select_modules
from hf_gradext.projection.blocks import FORMAT, build_blocks, check_blocks, weight_owners
from tests.projection.conftest import make_tiny_gpt2


def _blocks(model, layers="mlp", split="balanced"):
    return build_blocks(
        model, select_modules(model, layers), layers=layers, rank_total=16, rank_min=2, split=split, seed=1
    )


def test_blocks_follow_module_order_with_contiguous_slices_and_the_split_rule():
    model = make_tiny_gpt2()
    blocks = _blocks(model)
    assert [b.name for b in blocks] == [
        f"transformer.h.{i}.mlp.{m}" for i in range(2) for m in ("c_fc", "c_proj")
    ]
    assert [(b.slice_start, b.slice_end) for b in blocks] == [(0, 16), (16, 32), (32, 48), (48, 64)]
    assert all((b.k_i, b.k_o) == (4, 4) for b in blocks)  # balanced; cost picks an unequal split
    assert any((b.k_i, b.k_o) != (4, 4) for b in _blocks(model, split="cost"))


def test_tied_weights_have_one_owner_list_and_a_head_alone_is_not_projected():
    model = make_tiny_gpt2(tie=True)
    owners = weight_owners(model)
    assert owners[id(model.lm_head.weight)] == ["transformer.wte", "lm_head"]
    with pytest.raises(UserFacingError, match="--proj_layers='lm_head' selects no"):
        _blocks(model, layers="lm_head")


def test_check_blocks_refuses_a_layout_of_another_model():
    blocks = _blocks(make_tiny_gpt2())
    check_blocks(blocks, make_tiny_gpt2(), FORMAT)  # the same architecture fits
    blocks[0].original_shape = [1, 2]
    with pytest.raises(UserFacingError, match="does not exist in this model with that shape"):
        check_blocks(blocks, make_tiny_gpt2(), FORMAT)
