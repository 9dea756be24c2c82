"""Projection takes its per-layer math from the per-sample gradient registry (issue #11, items 1-3).

Oracle everywhere: ``naive_project`` (materialize, then ``P_o G P_i^T``) of the exact per-sample gradients
from :func:`hf_gradext.grad.per_sample_gradients` in float64, over *every* module (``layers="all"``), so a
tied weight's reference gradient is the sum of all its uses whatever the projector selected.

Measured on the code before the registry route (per-module dispatch in ``projector.py``), relative error
``||rows - naive|| / ||naive||`` of the whole row: GPT-2 tied, ``mlp,attn`` + embeddings 0.96 (the ``wte``
block 0.98: its ``lm_head`` half was missing), ``attn`` + embeddings 0.97; Llama with ``padding_idx`` used
as a real token 1.8 (``embed_tokens`` block 2.6); LoRA + ``modules_to_save`` embedding 3.0; LoRA +
``include_embeddings`` raised; a registered custom family was projected with Conv1D math (wrong shapes).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from hf_gradext.errors import UserFacingError
from hf_gradext.grad import LossScale, per_sample_gradients, register_layer_math
from hf_gradext.grad.factors import Contribution, Outer, as_tokens
from hf_gradext.projection import KroneckerProjector
from hf_gradext.projection.projector import FORMAT, FORMAT_V1
from tests.helpers import make_ragged_batch, make_tiny_gpt2

VOCAB = 61


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _gpt2() -> nn.Module:
    return make_tiny_gpt2(
        tie=True,
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=16,
        dtype=torch.float64,
        perturb=0.1,
        training=False,
    )


def _batch(vocab: int = VOCAB, seed: int = 1) -> dict[str, Tensor]:
    # min_token=0: the pad id 0 is also drawn as a real (attended, supervised) token
    return make_ragged_batch(
        lengths=(7, 4, 6), seq_len=7, vocab_size=vocab, seed=seed, position_ids=False, min_token=0
    )


def _exact_rows(proj: KroneckerProjector, model: nn.Module, batch: dict) -> Tensor:
    grads = per_sample_gradients(model, batch, layers="all", dtype=torch.float64)
    return proj.naive_project(grads)


def _projector(model: nn.Module, **kw) -> KroneckerProjector:
    return KroneckerProjector(model, rank_total=16, rank_min=2, seed=3, **kw)


# --------------------------------------------------------------------------------------------- tied GPT-2
@pytest.mark.parametrize(
    "layers,embeddings",
    [("all", False), ("mlp,attn", True), ("attn", True), ("attn", False)],
    ids=["all", "mlp_attn+emb", "attn+emb", "attn"],
)
def test_tied_gpt2_rows_equal_naive_projection_of_exact_grads(layers, embeddings):
    model, batch = _gpt2(), _batch()
    proj = _projector(model, layers=layers, include_embeddings=embeddings)
    rows = proj.project(batch)
    assert _rel(rows, _exact_rows(proj, model, batch)) <= 1e-10  # old code: 0.96 / 0.97 with embeddings
    blocks = {b.name: b for b in proj.blocks}
    has_table = layers == "all" or embeddings
    assert ("transformer.wte" in blocks) == has_table and "lm_head" not in blocks
    if has_table:
        assert blocks["transformer.wte"].tied_modules == ["lm_head"]
        assert "^lm_head$" in proj.capture_layers()  # the head is hooked for the table's weight


def test_tied_block_from_the_training_backward_engine():
    """The callback path (make_engine(weight_grads=True) armed around a training-style backward)."""
    from hf_gradext.projection.projector import causal_lm_loss

    model, batch = _gpt2(), _batch()
    proj = _projector(model, layers="mlp,attn", include_embeddings=True)
    engine = proj.make_engine(weight_grads=True)
    with engine.capture(proj.loss_scale(batch)):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        causal_lm_loss(model(**inputs).logits, batch["labels"]).backward()
    engine.remove()
    rows = proj.collect()
    model.zero_grad()
    assert _rel(rows, _exact_rows(proj, model, batch)) <= 1e-10


# ---------------------------------------------------------------------------------- Llama with padding_idx
def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=50, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).double().eval()


def _llama_batch() -> dict[str, Tensor]:
    batch = _batch(vocab=50, seed=2)
    for i, t in ((0, 2), (2, 1)):  # the pad id 0 as a real, attended and supervised token
        batch["input_ids"][i, t] = batch["labels"][i, t] = 0
    assert int((batch["input_ids"].eq(0) & batch["attention_mask"].bool()).sum()) >= 2
    return batch


# LlamaRMSNorm computes in float32 even in a float64 model: float32 round-off is the floor here.
LLAMA_TOL = 1e-6


def test_llama_padding_idx_row_gets_no_gradient():
    model, batch = _llama(), _llama_batch()
    assert model.model.embed_tokens.padding_idx == 0
    proj = _projector(model, layers="all", include_embeddings=True)
    rows, exact = proj.project(batch), _exact_rows(proj, model, batch)
    block = next(b for b in proj.blocks if b.name == "model.embed_tokens")
    cut = slice(block.slice_start, block.slice_end)
    assert _rel(rows[:, cut], exact[:, cut]) <= LLAMA_TOL  # old code: 2.6
    assert _rel(rows, exact) <= LLAMA_TOL  # old code: 1.8


# ------------------------------------------------------------------------------------------------ peft LoRA
def test_lora_with_include_embeddings_projects_the_adapters():
    """Under peft the tables are frozen: include_embeddings adds nothing (old code: UserFacingError)."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        _gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    ).eval()
    batch = _batch()
    proj = _projector(model, layers="lora", include_embeddings=True)
    assert all(".lora_" in b.name for b in proj.blocks) and len(proj.blocks) == 4
    assert _rel(proj.project(batch), _exact_rows(proj, model, batch)) <= 1e-10


def test_lora_with_a_trained_padded_embedding_copy():
    """LoRA on q/v plus ``modules_to_save=["embed_tokens"]``: a trainable copy that keeps padding_idx."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False, modules_to_save=["embed_tokens"]
    )
    model = peft.get_peft_model(_llama(), config).eval()
    batch = _llama_batch()
    proj = _projector(model, layers="lora", include_embeddings=True)
    names = [b.name for b in proj.blocks]
    assert names[0].endswith("embed_tokens.modules_to_save.default") and len(names) == 9
    assert _rel(proj.project(batch), _exact_rows(proj, model, batch)) <= LLAMA_TOL  # old code: 3.0


# ------------------------------------------------------------------------------- any registered family
class ScaledLinear(nn.Module):
    """A layer no projector code knows: ``y = s * x W^T`` with ``W`` ``[out, in]`` (not an nn.Linear)."""

    def __init__(self, d_in: int, d_out: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in, dtype=torch.float64) / d_in**0.5)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x @ self.weight.T


@register_layer_math(ScaledLinear, family="linear")
def _scaled_linear_math(module: nn.Module, a: Tensor, g: Tensor, trainable=None) -> dict[str, Contribution]:
    a, g = as_tokens(a), as_tokens(g)  # (B, T, d_in), (B, T, d_out)
    if trainable is not None and not trainable(module.weight):
        return {}
    return {"weight": Outer(u=module.scale * g, v=a, m=g.shape[-1])}


class _TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 6, dtype=torch.float64)
        self.mlp = nn.ModuleDict({"up": ScaledLinear(6, 9, 3.0), "down": ScaledLinear(9, 6, 0.5)})
        self.head = nn.Linear(6, VOCAB, dtype=torch.float64)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> SimpleNamespace:
        h = self.embed(input_ids)  # (B, T, 6)
        h = h + self.mlp["down"](torch.tanh(self.mlp["up"](h)))
        return SimpleNamespace(logits=self.head(h))  # (B, T, V)


def test_a_registered_custom_family_is_projected_with_its_own_math():
    model, batch = _TinyLM().eval(), _batch()
    proj = _projector(model, layers="mlp")
    assert [(b.name, b.type, b.layout) for b in proj.blocks] == [
        ("mlp.up", "linear", "out_in"),
        ("mlp.down", "linear", "out_in"),
    ]
    # old code: the Conv1D path (a P_i with d_in = out: a shape error), and the scale was ignored
    assert _rel(proj.project(batch), _exact_rows(proj, model, batch)) <= 1e-10


# ------------------------------------------------------------------------------------------------ metadata
def test_metadata_is_version_2_and_round_trips():
    model, batch = _gpt2(), _batch()
    proj = _projector(model, layers="mlp,attn", include_embeddings=True)
    meta = json.loads(json.dumps(proj.metadata()))
    assert meta["format"] == FORMAT == "hf_gradext.projection/2"
    again = KroneckerProjector.from_metadata(meta, model)
    torch.testing.assert_close(again.project(batch), proj.project(batch), rtol=0, atol=0)


def test_version_1_metadata_is_read_when_unaffected_and_refused_when_not():
    model = _gpt2()
    fine = _projector(model, layers="attn").metadata() | {"format": FORMAT_V1}
    assert KroneckerProjector.from_metadata(fine, model).metadata()["layers"] == fine["layers"]
    # what version 1 wrote for mlp,attn + embeddings: the wte block without its tied lm_head
    tied = _projector(model, layers="mlp,attn", include_embeddings=True).metadata() | {"format": FORMAT_V1}
    tied["layers"][0]["tied_modules"] = []
    with pytest.raises(UserFacingError, match="projected without lm_head.*re-run the projection"):
        KroneckerProjector.from_metadata(tied, model)
    llama = _llama()
    padded = _projector(llama, layers="embed").metadata() | {"format": FORMAT_V1}
    with pytest.raises(UserFacingError, match="padding_idx=0.*re-run the projection"):
        KroneckerProjector.from_metadata(padded, llama)


def test_version_2_metadata_of_another_tie_is_refused():
    model = _gpt2()
    meta = _projector(model, layers="all").metadata()
    untied = make_tiny_gpt2(tie=False, vocab_size=VOCAB, n_positions=32, n_embd=16, dtype=torch.float64)
    with pytest.raises(UserFacingError, match="shares its weight with \\['lm_head'\\]"):
        KroneckerProjector.from_metadata(meta, untied)
    with pytest.raises(UserFacingError, match="is not 'hf_gradext.projection/2'"):
        KroneckerProjector.from_metadata(meta | {"format": "hf_gradext.projection/9"}, model)


def test_projection_asks_the_one_shift_answer():
    """A GPT-2 whose loss is set to a non-shifting one: the projector's loss and scale follow the model.

    (The old projector decided from ``config.is_encoder_decoder`` and always shifted: 0.79 off here.)
    """
    from transformers.loss.loss_utils import ForMaskedLMLoss

    model, batch = _gpt2(), _batch()
    model.loss_function = ForMaskedLMLoss  # what HF's own forward would now compute: no shift
    proj = _projector(model, layers="all")
    scale = proj.loss_scale(batch)
    assert torch.equal(scale.sample_scale, LossScale.batch_mean(batch, shift=False).sample_scale)
    assert _rel(proj.project(batch), _exact_rows(proj, model, batch)) <= 1e-10
