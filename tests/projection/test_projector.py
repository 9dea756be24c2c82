import json

import pytest
import torch

from hf_gradext.errors import UserFacingError
from hf_gradext.projection import KroneckerProjector
from tests.projection.conftest import make_batch, make_tiny_gpt2, oracle_grads


def _max_rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("method", ["gaussian", "rademacher", "row_orthonormal"])
def test_kronecker_equals_naive_projection_of_exact_grads_float64(tie, method):
    model = make_tiny_gpt2(tie=tie)
    batch = make_batch()
    proj = KroneckerProjector(
        model,
        layers="all",
        rank_total=16,
        rank_min=2,
        seed=5,
        method=method,
        include_embeddings=True,
    )
    assert proj.metadata()["proj_method"] == method
    rows = proj.project(batch)
    assert rows.dtype == torch.float64 and rows.shape == (3, proj.dim)
    exact = oracle_grads(model, batch, sorted({b.weight_name for b in proj.blocks}))
    naive = proj.naive_project(exact)
    assert _max_rel(rows, naive) <= 1e-10
    types = {b.name: b for b in proj.blocks}
    assert types["transformer.wte"].tied_modules == (["lm_head"] if tie else [])
    assert ("lm_head" in types) == (not tie)
    assert all(p.grad is None for p in model.parameters())  # no ordinary weight gradients


def test_default_layers_are_block_conv1d_weights_and_slices_are_contiguous(tiny_gpt2):
    proj = KroneckerProjector(tiny_gpt2, rank_total=16, rank_min=2)
    names = [b.name for b in proj.blocks]
    assert names == [
        f"transformer.h.{i}.{m}"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert proj.blocks[0].slice_start == 0
    assert all(a.slice_end == b.slice_start for a, b in zip(proj.blocks, proj.blocks[1:]))
    assert all(b.layout == "in_out" and b.type == "conv1d" and b.k_i * b.k_o == 16 for b in proj.blocks)


def test_same_example_in_different_batches_padded_or_not():
    model = make_tiny_gpt2(dtype=torch.float32)
    proj = KroneckerProjector(model, rank_total=16, rank_min=2)
    full = make_batch(lengths=(5, 7, 3), seq=7, seed=3)
    alone = {k: v[:1, :5] for k, v in full.items()}  # first example, unpadded
    other = {k: torch.cat([v[1:2], v[:1]]) for k, v in full.items()}  # first example now second, padded
    r_full, r_alone, r_other = proj.project(full), proj.project(alone), proj.project(other)
    torch.testing.assert_close(r_full[0], r_alone[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(r_full[0], r_other[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(r_full[1], r_other[0], rtol=1e-4, atol=1e-6)


def test_from_metadata_rebuilds_identical_projector(tmp_path, tiny_gpt2):
    proj = KroneckerProjector(
        tiny_gpt2, layers="mlp", rank_total=24, rank_min=2, seed=9, row_orthonormal=True
    )
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(proj.metadata()))
    again = KroneckerProjector.from_metadata(tmp_path, tiny_gpt2)
    assert again.metadata() == proj.metadata()
    for b in proj.blocks:
        assert all(torch.equal(x, y) for x, y in zip(proj.factors(b.name), again.factors(b.name)))
    batch = make_batch()
    torch.testing.assert_close(proj.project(batch), again.project(batch), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["gaussian", "rademacher"])
def test_from_metadata_keeps_the_method(tmp_path, tiny_gpt2, method):
    proj = KroneckerProjector(tiny_gpt2, layers="mlp", rank_total=16, rank_min=2, seed=3, method=method)
    again = KroneckerProjector.from_metadata(proj.metadata(), tiny_gpt2)
    assert again.method == method
    for b in proj.blocks:
        assert all(torch.equal(x, y) for x, y in zip(proj.factors(b.name), again.factors(b.name)))


def test_balanced_split_is_recorded_and_rebuilt(tiny_gpt2):
    # c_attn is 32 -> 96 in the tiny model: cost picks 8 x 2, balanced 4 x 4
    cost = KroneckerProjector(tiny_gpt2, layers="attn", rank_total=16, rank_min=2, split="cost")
    bal = KroneckerProjector(tiny_gpt2, layers="attn", rank_total=16, rank_min=2)  # the default
    assert [(b.k_i, b.k_o) for b in cost.blocks][0] != (4, 4)
    assert [(b.k_i, b.k_o) for b in bal.blocks] == [(4, 4), (4, 4)] * 2
    assert "proj_split" not in cost.metadata()  # directories from before the key (all cost) still match
    assert KroneckerProjector(tiny_gpt2, rank_total=16, rank_min=2).method == "rademacher"
    again = KroneckerProjector.from_metadata(bal.metadata(), tiny_gpt2)
    assert again.split == "balanced" and again.metadata() == bal.metadata()
    batch = make_batch()
    torch.testing.assert_close(bal.project(batch), again.project(batch), rtol=0, atol=0)


def test_from_metadata_refuses_an_unknown_method(tiny_gpt2):
    # An unknown method used to rebuild Gaussian factors silently: rows that no longer match the stored ones.
    meta = {**KroneckerProjector(tiny_gpt2, rank_total=16, rank_min=2).metadata(), "proj_method": "sparse"}
    with pytest.raises(UserFacingError, match="proj_method 'sparse'"):
        KroneckerProjector.from_metadata(meta, tiny_gpt2)


def test_method_arguments_are_checked(tiny_gpt2):
    with pytest.raises(ValueError, match="contradicts"):
        KroneckerProjector(tiny_gpt2, rank_total=16, rank_min=2, row_orthonormal=True, method="rademacher")
    with pytest.raises(ValueError, match="use one of"):
        KroneckerProjector(tiny_gpt2, rank_total=16, rank_min=2, method="sparse")


def test_from_metadata_rejects_other_model(tiny_gpt2):
    meta = KroneckerProjector(tiny_gpt2, rank_total=16, rank_min=2).metadata()
    meta["layers"][0]["original_shape"] = [99, 99]
    with pytest.raises(UserFacingError, match="does not exist in this model"):
        KroneckerProjector.from_metadata(meta, tiny_gpt2)


def test_selection_without_projectable_layers_is_an_error(tiny_gpt2):
    with pytest.raises(UserFacingError, match="selects no Linear/Conv1D"):
        KroneckerProjector(tiny_gpt2, layers="norm")


def test_bf16_model_projects_without_dtype_crash():
    model = make_tiny_gpt2(dtype=torch.float64)
    batch = make_batch()
    ref = KroneckerProjector(model, rank_total=16, rank_min=2).project(batch)
    low = KroneckerProjector(model.to(torch.bfloat16), rank_total=16, rank_min=2).project(batch)
    assert low.dtype == torch.float32
    assert float((low.double() - ref).norm() / ref.norm()) < 5e-2


def test_global_rng_untouched(tiny_gpt2):
    state = torch.get_rng_state()
    KroneckerProjector(tiny_gpt2, rank_total=16, rank_min=2, include_embeddings=True).project(make_batch())
    assert torch.equal(state, torch.get_rng_state())


def test_naive_projection_from_metadata_of_engine_grads_float64(tiny_gpt2):
    """per_sample_gradients (the engine's API) projected with P rebuilt from metadata == Kronecker rows."""
    from hf_gradext.grad import per_sample_gradients

    batch = make_batch()
    proj = KroneckerProjector(tiny_gpt2, layers="all", rank_total=16, rank_min=2, include_embeddings=True)
    rows = proj.project(batch)
    rebuilt = KroneckerProjector.from_metadata(json.loads(json.dumps(proj.metadata())), tiny_gpt2)
    grads = per_sample_gradients(tiny_gpt2, batch, layers=proj.capture_layers(), dtype=torch.float64)
    naive = rebuilt.naive_project(grads)
    assert _max_rel(rows, naive) <= 1e-10


@pytest.mark.parametrize(
    "layers,expected",
    [
        ("mlp.c_fc", ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]),
        (
            "transformer.h.0",
            [
                "transformer.h.0.attn.c_attn",
                "transformer.h.0.attn.c_proj",
                "transformer.h.0.mlp.c_fc",
                "transformer.h.0.mlp.c_proj",
            ],
        ),  # ln_1/ln_2 skipped
        ("attn", [f"transformer.h.{i}.attn.{m}" for i in range(2) for m in ("c_attn", "c_proj")]),
    ],
)
def test_layer_patterns(tiny_gpt2, layers, expected):
    assert [
        b.name for b in KroneckerProjector(tiny_gpt2, layers=layers, rank_total=16, rank_min=2).blocks
    ] == expected


def test_tied_head_without_embeddings_is_not_projected_alone(tiny_gpt2):
    proj = KroneckerProjector(tiny_gpt2, layers="lm_head,mlp", rank_total=16, rank_min=2)
    assert "lm_head" not in [b.name for b in proj.blocks]


def test_projector_from_args_maps_every_flag():
    from types import SimpleNamespace

    from hf_gradext.projection.projector import projector_from_args

    model = make_tiny_gpt2(dtype=torch.float32)
    args = SimpleNamespace(
        proj_layers="mlp",
        proj_rank_total=16,
        proj_rank_min=2,
        proj_seed=7,
        proj_row_orthonormal=True,
        proj_method="gaussian",
        proj_split="cost",
        include_embeddings=True,
        proj_dtype="float32",
    )
    explicit = KroneckerProjector(
        model, layers="attn", rank_total=16, rank_min=2, seed=7, row_orthonormal=True,
        include_embeddings=True, dtype="float32", split="cost",
    )  # fmt: skip
    assert projector_from_args(model, args, layers="attn").metadata() == explicit.metadata()
    assert projector_from_args(model, args).metadata()["layers"] != explicit.metadata()["layers"]
    args.proj_row_orthonormal, args.proj_method, args.proj_split = False, "rademacher", "balanced"
    again = projector_from_args(model, args, layers="attn")
    assert again.method == "rademacher" and again.split == "balanced"
