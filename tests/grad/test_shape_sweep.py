"""Shape sweep over every registered layer family, in the spirit of Opacus's grad_sample tests.

Each case runs ONE armed forward + backward through :class:`CaptureEngine` (real hooks, real reshaping)
and compares, per parameter, against a float64 loop over samples (each sample's own forward and
``torch.autograd`` backward):

* per-sample gradients (``materialize_sum``; sparse embedding rows densified);
* per-sample squared norms and the ``(B, B)`` inner products with every norm method
  (``auto``, forced ``ghost``, ``materialize``).

Families: ``nn.Linear`` and HF ``Conv1D`` (bias on/off), ``nn.Embedding`` (``padding_idx`` a real token id
that occurs in the input), an embedding tied to a linear head (the mixed index/dense ghost),
``nn.LayerNorm`` (every ``normalized_shape`` that fits, including all non-batch dims; affine off, weight
only, weight + bias), ``nn.RMSNorm`` / hf_gradext's ``GradExtRMSNorm`` / an HF-style ``*RMSNorm``, and the
``torch.func`` fallback; batch sizes 0, 1 and 3; layer inputs of rank 2 to 4. peft LoRA adapters are
``nn.Linear`` modules (no family of their own), covered by the Linear cases and ``test_api``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from _grad_helpers import dense, loop_oracle, rel_err
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_gradext.grad.capture import CaptureEngine
from hf_gradext.grad.factors import NORM_METHODS, dots, materialize_sum, sq_norms
from hf_gradext.grad.registry import lookup
from hf_gradext.patches.rms_norm import GradExtRMSNorm

D_IN, D_OUT, VOCAB, PAD = 5, 4, 7, 2
BATCHES = (0, 1, 3)
RANKS = (2, 3, 4)
TOKEN_DIMS = {2: (), 3: (3,), 4: (2, 3)}  # layer input (B, *TOKEN_DIMS[rank], features)
TOL = 1e-10
D64 = torch.float64


def _loss(out: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Sum of per-sample losses; quadratic so the output gradient depends on the output."""
    return (out * r).sum() + 0.5 * out.pow(2).sum()


def _check(model: nn.Module, x: torch.Tensor, unsupported: str = "error") -> dict[str, torch.Tensor]:
    """Engine vs loop oracle for every trainable parameter of ``model``; returns the oracle."""
    model = model.to(D64)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        out_shape = model(x).shape
    r = torch.randn(out_shape, generator=gen, dtype=D64)  # (B, ...) per-sample loss weights
    ref = loop_oracle(model, x, lambda out_i, i: _loss(out_i, r[i : i + 1]))
    engine = CaptureEngine(model, "all", keep=True, weight_grads=False, unsupported=unsupported)
    try:
        with engine.capture(None):
            _loss(model(x), r).backward()  # gradient of sum_i L_i
    finally:
        engine.remove()
    cs = engine.contributions()
    assert set(cs) == set(ref)
    batch = x.shape[0]
    for name, r_grad in ref.items():
        got = dense(materialize_sum(cs[name]))
        assert got.shape == r_grad.shape, name
        assert rel_err(got, r_grad) <= TOL, name
        flat = r_grad.flatten(1)  # (B, numel)
        for method in NORM_METHODS:
            sq = sq_norms(cs[name], method)
            assert sq.shape == (batch,), (name, method)
            assert rel_err(sq, flat.pow(2).sum(1)) <= TOL, (name, method)
            gram = dots(cs[name], cs[name], method)
            assert gram.shape == (batch, batch), (name, method)
            assert rel_err(gram, flat @ flat.T) <= TOL, (name, method)
    return ref


def _features(batch: int, rank: int, d: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *TOKEN_DIMS[rank], d, generator=gen, dtype=D64) * 2 + 0.5


def _ids(batch: int, rank: int, seed: int = 0) -> torch.Tensor:
    """Ids whose embedding output has rank ``rank``; ``PAD`` occurs as a real token id."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, *TOKEN_DIMS[rank]), generator=gen)
    ids.view(-1)[::2] = PAD
    return ids


# --------------------------------------------------------------------------- Linear / Conv1D
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("batch", BATCHES)
def test_linear(batch: int, rank: int, bias: bool) -> None:
    torch.manual_seed(0)
    ref = _check(nn.Linear(D_IN, D_OUT, bias=bias), _features(batch, rank, D_IN))
    assert set(ref) == ({"weight", "bias"} if bias else {"weight"})


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("batch", BATCHES)
def test_conv1d(batch: int, rank: int, bias: bool) -> None:
    torch.manual_seed(0)
    layer = Conv1D(D_OUT, D_IN)  # weight [in, out]; HF Conv1D always has a bias: freeze it for "off"
    nn.init.normal_(layer.bias)
    layer.bias.requires_grad_(bias)
    ref = _check(layer, _features(batch, rank, D_IN))
    assert set(ref) == ({"weight", "bias"} if bias else {"weight"})


# --------------------------------------------------------------------------- Embedding
@pytest.mark.parametrize("padding_idx", [None, PAD])
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("batch", BATCHES)
def test_embedding(batch: int, rank: int, padding_idx: int | None) -> None:
    torch.manual_seed(0)
    layer = nn.Embedding(VOCAB, D_OUT, padding_idx=padding_idx)
    ids = _ids(batch, rank)
    ref = _check(layer, ids)
    if padding_idx is not None:  # the padding row never gets a gradient, although PAD is in the input
        assert torch.count_nonzero(ref["weight"][:, PAD]) == 0
    elif batch:
        assert torch.count_nonzero(ref["weight"][:, PAD]) > 0


class TiedHead(nn.Module):
    """Embedding tied to a linear head: the table gets a sparse-row and a dense contribution."""

    def __init__(self, padding_idx: int | None) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D_OUT, padding_idx=padding_idx)
        self.head = nn.Linear(D_OUT, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids)))  # (B, ..., V)


@pytest.mark.parametrize("padding_idx", [None, PAD])
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("batch", BATCHES)
def test_tied_embedding(batch: int, rank: int, padding_idx: int | None) -> None:
    torch.manual_seed(0)
    ref = _check(TiedHead(padding_idx), _ids(batch, rank))
    assert set(ref) == {"emb.weight"}


# --------------------------------------------------------------------------- norms
def _norm_shapes() -> list[tuple[int, int]]:
    """(rank, k): normalize the last k dims, up to every non-batch dim."""
    return [(rank, k) for rank in RANKS for k in range(1, rank)]


def _norm_ids(cases: list[tuple[int, int]]) -> list[str]:
    return [f"rank{rank}-k{k}" for rank, k in cases]


def _check_norm(make: Callable[[tuple[int, ...]], nn.Module], batch: int, rank: int, k: int) -> None:
    torch.manual_seed(0)
    x = _features(batch, rank, D_OUT)  # (B, *tokens, D_OUT)
    shape = tuple(x.shape[x.dim() - k :])
    layer = make(shape)
    params = list(layer.parameters())
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p))  # away from the ones / zeros init
    spec = lookup(layer)
    assert spec is not None and spec.family == "norm"
    if not params:
        # No affine parameters: nothing to report, and the selection never hooks the layer; check it
        # still sits in a model whose other layers come out right.
        assert spec.math(layer, x, torch.randn_like(x)) == {}
        ref = _check(nn.Sequential(nn.Linear(D_OUT, D_OUT), layer), x)
        assert set(ref) == {"0.weight", "0.bias"}
        return
    ref = _check(layer, x)
    assert {n: r.shape for n, r in ref.items()} == {n: (batch, *shape) for n, _ in layer.named_parameters()}


NORM_CASES = _norm_shapes()


@pytest.mark.parametrize("affine", ["off", "weight", "weight+bias"])
@pytest.mark.parametrize(("rank", "k"), NORM_CASES, ids=_norm_ids(NORM_CASES))
@pytest.mark.parametrize("batch", BATCHES)
def test_layer_norm(batch: int, rank: int, k: int, affine: str) -> None:
    def make(shape: tuple[int, ...]) -> nn.Module:
        return nn.LayerNorm(shape, elementwise_affine=affine != "off", bias=affine == "weight+bias")

    _check_norm(make, batch, rank, k)


class LlamaLikeRMSNorm(nn.Module):
    """HF-style RMSNorm (``variance_epsilon``, no ``normalized_shape``), found by the name suffix."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


@pytest.mark.parametrize("variant", ["affine", "no_affine", "eps_none"])
@pytest.mark.parametrize(("rank", "k"), NORM_CASES, ids=_norm_ids(NORM_CASES))
@pytest.mark.parametrize("batch", BATCHES)
def test_rms_norm(batch: int, rank: int, k: int, variant: str) -> None:
    def make(shape: tuple[int, ...]) -> nn.Module:
        eps = None if variant == "eps_none" else 1e-5
        return nn.RMSNorm(shape, eps=eps, elementwise_affine=variant != "no_affine")

    _check_norm(make, batch, rank, k)


@pytest.mark.parametrize("cls", [GradExtRMSNorm, LlamaLikeRMSNorm])
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("batch", BATCHES)
def test_last_dim_rms_norms(batch: int, rank: int, cls: type[nn.Module]) -> None:
    _check_norm(lambda shape: cls(shape[-1]), batch, rank, 1)


# --------------------------------------------------------------------------- torch.func fallback
class Scale(nn.Module):
    """An unregistered module: ``x * w + c`` over the last dim (the vmap fallback computes it)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))
        self.c = nn.Parameter(torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w + self.c


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("batch", BATCHES)
def test_fallback(batch: int, rank: int) -> None:
    torch.manual_seed(0)
    ref = _check(Scale(D_OUT), _features(batch, rank, D_OUT), unsupported="torch.func")
    assert set(ref) == {"w", "c"}
