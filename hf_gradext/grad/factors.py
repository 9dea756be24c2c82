"""Per-sample gradient *contributions* and the algebra on them (pure torch).

Every layer's math turns a captured ``(a, g)`` pair into, per parameter, either

* :class:`Outer` -- ``grad_i = sum_t u_it (x) v_it`` in the parameter's own layout ``[m, n]``
  (``v is None`` for a bias: ``grad_i = sum_t u_it``); ``u`` may be an index tensor (embedding rows,
  one-hot over ``m``), or
* :class:`Dense` -- an already materialized ``(B, *param.shape)`` tensor (norm layers, fallback).

A parameter used by several modules (GPT-2's tied ``wte`` / ``lm_head``) gets a list of contributions;
its gradient is their sum, its squared norm the sum of all pairwise inner products. Inner products of
two ``Outer`` weight terms need not build the gradient (the "ghost" identity)::

    <sum_t u_t v_t^T, sum_s u'_s v'_s^T> = sum_{t,s} (u_t . u'_s) (v_t . v'_s)

Biases (``v is None``) never take the ghost path: ``sum_t u_t`` costs ``B T m``, the ``T x S`` Gram of the
ghost ``B T S m``, and the sum is as exact as anything computed from ``u``.

Accuracy of the ghost identity (why the factors are centered)
-------------------------------------------------------------
The ghost sum has ``T S`` terms of size ``|u_t||u'_s||v_t||v'_s|``; each Gram entry is rounded with an error
of about ``gamma_m |u_t||u'_s|`` (``gamma_m = m * unit_roundoff`` worst case, ``~ sqrt(m) * unit_roundoff``
typically). So, for one sample, the rounding error of ``||G||^2`` is bounded (to first order) by::

    |err| <= (gamma_m + gamma_n) * (sum_t |u_t| |v_t|)^2 = (gamma_m + gamma_n) * K * ||G||^2,
    K = (sum_t |u_t| |v_t|)^2 / ||G||^2 >= 1

whereas materializing ``G`` then squaring it errs by ``~ 2 gamma_T sqrt(K) ||G||^2``: the ghost squares the
condition number of the token sum. ``K`` is large exactly when the token terms cancel, and transformers
cancel systematically: the gradient w.r.t. attention *keys* sums to zero over the keys of every query
(softmax rows sum to one), while the layer input (a LayerNorm output with its bias, residual "massive
activation" dimensions, averaged attention values) shares a large common component ``c`` across tokens.
With ``a_t = c + e_t`` and ``sum_t g_t ~ 0``, ``G = sum_t g_t e_t^T`` is small but the Gram entries are of
size ``|c|^2``: ``K ~ T |c|^2 / |e|^2``. Measured on synthetic key-like factors (float32, ``T = 512``,
``|c| / |e|`` = 100 and 1000 per element; ``tests/grad/test_factors.py``): 2.8e-4 and 5.3e-2 relative error
of ``||G||^2`` with uncentered Grams, against ~2e-6 and ~9e-6 materialized.
In GPT-2's fused ``c_attn`` the query and value columns dominate ``||G||`` and mask the key columns'
cancellation (small random GPT-2s measure at float32 roundoff even uncentered); separate key projections,
or a per-block slice of a fused weight, are exposed.

The fix is an exact reformulation: each dense factor is centered per sample (``u_t = u~_t + u_bar`` with
``u_bar`` the token mean, ``sum_t u~_t = 0``, the same for ``v``), which gives::

    G = G~ + T u_bar v_bar^T,      G~ = sum_t u~_t v~_t^T
    <G, G'> = <G~, G~'> + S u_bar'^T G~ v_bar' + T u_bar^T G~' v_bar + T S (u_bar . u_bar')(v_bar . v_bar')

The first term is a ghost sum over *centered* factors (its ``K~`` no longer sees the common component);
the three correction terms cost ``O(B T (m + n))``. Gram products are formed in the factors' dtype
promoted to at least float32 and reduced over ``(t, s)`` in float64. The error bound above then holds with
``K~ = (sum_t |u~_t| |v~_t|)^2 / ||G||^2``, plus the rounding of the centering itself, ``~ 2 u sqrt(K)`` (the
materialized path's own order). On the same synthetic factors the centered ghost errs by 3.3e-7 and 2.9e-6
(at most the materialized path's error); on GPT-2-like
models (``tests/grad/test_api.py``) float32 ghost norms are within 1e-4 (measured ~3e-7) of a float64 oracle
per parameter. The mixed index/dense ghost of a tied embedding with its output head is not centered (its
one-hot factor has no common component to remove); its Gram products are reduced in float64 as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from hf_gradext.grad.sparse import SparseRowGrad

NormMethod = Literal["auto", "ghost", "materialize"]
NORM_METHODS: tuple[str, ...] = ("auto", "ghost", "materialize")


def as_tokens(x: Tensor) -> Tensor:
    """``(B, ..., d) -> (B, T, d)`` with ``T`` the product of the middle dims (``T = 1`` for ``(B, d)``).

    Sizes are explicit because ``reshape(B, -1, d)`` is ambiguous (and raises) for an empty batch.
    """
    if x.dim() < 2:
        raise ValueError(f"expected a (batch, ..., features) tensor, got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])


def as_token_ids(x: Tensor) -> Tensor:
    """``(B, ...) -> (B, T)`` index tensor (``T = 1`` for ``(B,)`` ids); explicit sizes, as in :func:`as_tokens`."""
    if x.dim() < 1:
        raise ValueError("expected a (batch, ...) index tensor, got a 0-dim tensor")
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


@dataclass
class Outer:
    """``grad_i = sum_t u_it (x) v_it``.

    Attributes:
        u: ``(B, T, m)`` dense factor, or ``(B, T)`` long row indices (one-hot rows of an ``m``-row table).
        v: ``(B, T, n)`` dense factor, or ``None`` for a 1-D parameter (``grad_i = sum_t u_it``).
        m: size of the first parameter dimension.
    """

    u: Tensor
    v: Tensor | None
    m: int

    @property
    def is_index(self) -> bool:
        return not self.u.is_floating_point()

    @property
    def batch_size(self) -> int:
        return self.u.shape[0]

    @property
    def seq_len(self) -> int:
        return self.u.shape[1]

    @property
    def numel(self) -> int:
        return self.m * (1 if self.v is None else self.v.shape[-1])

    def use_ghost(self, other_seq_len: int | None = None) -> bool:
        """Ghost (Gram) products iff ``2 T S < m n``: cheaper than building the ``m x n`` gradients.

        Never for biases (the token sum is cheaper and exact) nor for sparse rows (cheaper than a ``T x S``
        equality Gram).
        """
        if self.is_index or self.v is None:
            return False
        s = self.seq_len if other_seq_len is None else other_seq_len
        return 2 * self.seq_len * s < self.numel


@dataclass
class Dense:
    """A materialized per-sample gradient ``(B, *param.shape)``."""

    value: Tensor

    @property
    def batch_size(self) -> int:
        return self.value.shape[0]


Contribution = Outer | Dense
Materialized = Tensor | SparseRowGrad


def materialize(c: Contribution) -> Materialized:
    """The per-sample gradient of one contribution (sparse rows for index factors)."""
    if isinstance(c, Dense):
        return c.value
    if c.is_index:
        assert c.v is not None, "index factors need a value factor"
        return SparseRowGrad.from_tokens(c.u, c.v, c.m)
    if c.v is None:
        return c.u.sum(1)  # (B, m)
    return torch.einsum("btm,btn->bmn", c.u, c.v)  # (B, m, n)


def materialize_sum(cs: list[Contribution]) -> Materialized:
    """Sum of contributions to one parameter; stays sparse when every term is an index term."""
    parts = [materialize(c) for c in cs]
    if len(parts) == 1:
        return parts[0]
    dense_parts = [p for p in parts if isinstance(p, Tensor)]
    sparse_parts = [p for p in parts if isinstance(p, SparseRowGrad)]
    if not dense_parts:
        # Concatenate and re-unique so each (sample, row) appears once.
        s0 = sparse_parts[0]
        batch = s0.batch_size
        keys = torch.cat([s.sample_idx * s.num_rows + s.row_idx for s in sparse_parts])
        vals = torch.cat([s.values for s in sparse_parts])
        uniq, inv = torch.unique(keys, return_inverse=True)
        summed = vals.new_zeros(uniq.numel(), vals.shape[-1]).index_add_(0, inv, vals)
        return SparseRowGrad(uniq // s0.num_rows, uniq % s0.num_rows, summed, batch, s0.num_rows)
    total = dense_parts[0].clone()
    for p in dense_parts[1:]:
        total += p
    for s in sparse_parts:
        s.add_to_dense(total)
    return total


# --------------------------------------------------------------------------- ghost products
def _work_dtype(*xs: Tensor | None) -> torch.dtype:
    """The dtype Gram products are formed in: the floating factors' dtype promoted to at least float32."""
    dt = torch.float32
    for x in xs:
        if x is not None and x.is_floating_point():
            dt = torch.promote_types(dt, x.dtype)
    return dt


def _accumulate(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Sum over ``dims`` in float64: the reductions over ``T x S`` products are where fp32 sums lose most."""
    return x.sum(dims, dtype=torch.float64)


def _gram(x: Tensor, y: Tensor, diag: bool) -> Tensor:
    """Dense Gram ``x_t . y_s``: ``(B, T, S)`` (``diag``) or ``(Bx, By, T, S)``."""
    if diag:
        return torch.bmm(x, y.transpose(1, 2))  # (B, T, S)
    return torch.einsum("atm,bsm->abts", x, y)  # (Bx, By, T, S)


@dataclass
class _Centered:
    """A dense weight term split as ``G = sum_t u~_t v~_t^T + T u_bar v_bar^T`` (``sum_t u~_t = 0``)."""

    u: Tensor  # (B, T, m) centered
    v: Tensor  # (B, T, n) centered
    u_bar: Tensor  # (B, m) token mean
    v_bar: Tensor  # (B, n) token mean
    seq_len: int


def _center(c: Outer, dtype: torch.dtype) -> _Centered:
    assert c.v is not None and not c.is_index
    seq = c.seq_len
    u, v = c.u.to(dtype), c.v.to(dtype)
    # sum / max(T, 1): an empty token axis gives zero means instead of NaN.
    u_bar = u.sum(1) / max(seq, 1)  # (B, m)
    v_bar = v.sum(1) / max(seq, 1)  # (B, n)
    return _Centered(u - u_bar.unsqueeze(1), v - v_bar.unsqueeze(1), u_bar, v_bar, seq)


def _bar_dots(x: Tensor, bar: Tensor) -> Tensor:
    """``(B, T)`` dots of each token row of ``x`` (B, T, d) with its own sample's ``bar`` (B, d).

    ``linalg.vecdot`` rather than ``einsum("btd,bd->bt")``: on CPU the einsum lowers to a ``bmm`` with a
    one-column right side, several times slower than the fused multiply-reduce at these sizes.
    """
    return torch.linalg.vecdot(x, bar.unsqueeze(1))  # (B, T)


def _cross_bar_dots(x: Tensor, bar: Tensor) -> Tensor:
    """``(Bx, By, T)`` dots of the token rows of ``x`` (Bx, T, d) with every sample's ``bar`` (By, d)."""
    bx, t, d = x.shape
    return (x.reshape(bx * t, d) @ bar.T).reshape(bx, t, bar.shape[0]).transpose(1, 2)  # (Bx, By, T)


def _ghost_dense(c1: Outer, c2: Outer, diag: bool, bias_on: Literal["u", "v"] | None = None) -> Tensor:
    """Centered ghost inner products of two dense weight terms (see the module docstring).

    ``bias_on`` (only for ``c1 is c2``, ``diag``): also add the squared norm of the layer's bias, whose
    per-sample gradient is the token sum of the weight's ``u`` (``"u"``, ``nn.Linear``) or ``v`` (``"v"``,
    HF ``Conv1D``) factor. That is the weight with one more column of ones on the other factor,
    ``[W, b] = sum_t u_t (x) [v_t, 1]``: the ones center to zero, so only the last term changes,
    ``|u_bar|^2 |v_bar|^2 -> |u_bar|^2 (|v_bar|^2 + 1)``, i.e. ``+ T^2 |u_bar|^2 = |sum_t u_t|^2``, exactly.
    """
    dt = _work_dtype(c1.u, c1.v, c2.u, c2.v)
    x = _center(c1, dt)
    y = x if c2 is c1 else _center(c2, dt)
    if bias_on is not None and not (y is x and diag):
        raise ValueError("bias_on needs the squared norms of one weight term (c1 is c2, diag=True)")
    t, s = x.seq_len, y.seq_len
    main = _accumulate(_gram(x.u, y.u, diag) * _gram(x.v, y.v, diag), (-2, -1))  # (B,) | (Bx, By)
    if diag:
        # y.u_bar^T G~_x y.v_bar = sum_t (x.u_t . y.u_bar)(x.v_t . y.v_bar), and the same with x <-> y.
        cross_x = _accumulate(_bar_dots(x.u, y.u_bar) * _bar_dots(x.v, y.v_bar), (1,))  # (B,)
        cross_y = (
            cross_x if y is x else _accumulate(_bar_dots(y.u, x.u_bar) * _bar_dots(y.v, x.v_bar), (1,))
        )  # (B,)
        u_low = torch.linalg.vecdot(x.u_bar, y.u_bar).double()  # (B,)
        v_low = torch.linalg.vecdot(x.v_bar, y.v_bar).double()  # (B,)
        if bias_on == "u":
            v_low = v_low + 1.0  # the bias's column of ones on the v side
        elif bias_on == "v":
            u_low = u_low + 1.0
        low = u_low * v_low
    else:
        cross_x = _accumulate(
            _cross_bar_dots(x.u, y.u_bar) * _cross_bar_dots(x.v, y.v_bar), (-1,)
        )  # (Bx, By)
        cross_y = _accumulate(
            _cross_bar_dots(y.u, x.u_bar) * _cross_bar_dots(y.v, x.v_bar), (-1,)
        ).T  # (Bx, By)
        low = (x.u_bar @ y.u_bar.T).double() * (x.v_bar @ y.v_bar.T).double()  # (Bx, By)
    total = main + s * cross_x + t * cross_y + (t * s) * low
    return total.to(dt)


def _index_gram(x: Tensor, y: Tensor, diag: bool, dtype: torch.dtype) -> Tensor:
    """``x_t . y_s`` when at least one side is a ``(B, T)`` index factor (one-hot rows of the table)."""
    x_idx, y_idx = not x.is_floating_point(), not y.is_floating_point()
    if x_idx and y_idx:
        if diag:
            return (x.unsqueeze(2) == y.unsqueeze(1)).to(dtype)  # (B, T, S)
        return (x[:, None, :, None] == y[None, :, None, :]).to(dtype)  # (Bx, By, T, S)
    idx, dense = (x, y) if x_idx else (y, x)  # idx (Bi, T), dense (Bd, S, m)
    dense = dense.to(dtype)
    if diag:
        index = idx.unsqueeze(1).expand(-1, dense.shape[1], -1)  # (B, S, T)
        gram = torch.gather(dense, 2, index)  # (B, S, T): dense_s[idx_t]
        return gram.transpose(1, 2) if x_idx else gram
    bi, bd = idx.shape[0], dense.shape[0]
    index = idx[:, None, None, :].expand(bi, bd, dense.shape[1], idx.shape[1])  # (Bi, Bd, S, T)
    gram = torch.gather(dense.unsqueeze(0).expand(bi, -1, -1, -1), 3, index)  # (Bi, Bd, S, T)
    gram = gram.transpose(2, 3)  # (Bi, Bd, T_idx, S_dense)
    return gram if x_idx else gram.permute(1, 0, 3, 2)


def _ghost_mixed(c1: Outer, c2: Outer, diag: bool) -> Tensor:
    """Ghost products when a factor is an index tensor (a tied embedding with its dense head)."""
    assert c1.v is not None and c2.v is not None
    dt = _work_dtype(c1.u, c1.v, c2.u, c2.v)
    gu = _index_gram(c1.u, c2.u, diag, dt)
    gv = _gram(c1.v.to(dt), c2.v.to(dt), diag)
    return _accumulate(gu * gv, (-2, -1)).to(dt)  # (B,) | (Bx, By)


def _ghost(c1: Outer, c2: Outer, diag: bool) -> Tensor:
    if c1.is_index or c2.is_index:
        return _ghost_mixed(c1, c2, diag)
    return _ghost_dense(c1, c2, diag)


def _takes_ghost(c1: Outer, c2: Outer, method: str) -> bool:
    if c1.v is None or c2.v is None:
        return False  # biases: the token sum is exact and cheaper than any Gram
    if c1.is_index and c2.is_index:
        return False  # sparse rows join on row ids; an equality Gram is never cheaper
    if method == "materialize":
        return False
    if method == "ghost" or c1.is_index != c2.is_index:
        return True  # mixed: a T x S gather, never a table-sized tensor
    return c1.use_ghost(c2.seq_len)


# --------------------------------------------------------------------------- inner products
def _materialized_dots(x: Materialized, y: Materialized, diag: bool) -> Tensor:
    if isinstance(x, SparseRowGrad) and isinstance(y, SparseRowGrad):
        d = x.dots(y)
        return d.diagonal() if diag else d
    if isinstance(x, SparseRowGrad) or isinstance(y, SparseRowGrad):
        sp, de = (x, y) if isinstance(x, SparseRowGrad) else (y, x)
        de = de.to(sp.values.dtype)
        if diag:
            rows = de[sp.sample_idx, sp.row_idx]  # (U, dim)
            per = (rows * sp.values).sum(-1)  # (U,)
            return per.new_zeros(sp.batch_size).index_add_(0, sp.sample_idx, per)
        rows = de[:, sp.row_idx]  # (Bd, U, dim)
        per = torch.einsum("ud,jud->uj", sp.values, rows)  # (U, Bd)
        out = per.new_zeros(sp.batch_size, de.shape[0]).index_add_(0, sp.sample_idx, per)
        return out if isinstance(x, SparseRowGrad) else out.T
    y = y.to(x.dtype)
    if diag:
        return (x.flatten(1) * y.flatten(1)).sum(1)
    return x.flatten(1) @ y.flatten(1).T


def _check_method(method: str) -> None:
    if method not in NORM_METHODS:
        raise ValueError(f"method={method!r}: use one of {', '.join(NORM_METHODS)}")


def inner(c1: Contribution, c2: Contribution, diag: bool, method: NormMethod = "auto") -> Tensor:
    """Inner products between per-sample gradients of two contributions to the same parameter.

    Args:
        c1, c2: contributions (same parameter shape).
        diag: ``True`` -> ``(B,)`` with ``<c1_i, c2_i>`` (needs equal batch sizes); ``False`` ->
            ``(B1, B2)`` with ``<c1_i, c2_j>``.
        method: ``"auto"`` uses the (centered) ghost identity for two dense weight terms when
            ``2 T S < m n``, and for a dense term with an index term (a ``T x S`` gather, no table-sized
            tensor); ``"ghost"`` forces it for every dense-weight pair; ``"materialize"`` never uses it.
            Biases and two index terms are always materialized (exact token / row sums).
    """
    _check_method(method)
    if isinstance(c1, Outer) and isinstance(c2, Outer) and _takes_ghost(c1, c2, method):
        return _ghost(c1, c2, diag)
    if diag and c1 is c2:
        m = materialize(c1)
        return m.sq_norms() if isinstance(m, SparseRowGrad) else m.flatten(1).pow(2).sum(1)
    return _materialized_dots(materialize(c1), materialize(c2), diag)


def sq_norms(cs: list[Contribution], method: NormMethod = "auto") -> Tensor:
    """``(B,)`` squared norm of the per-sample gradient ``sum(cs)``: all pairwise inner products."""
    total = inner(cs[0], cs[0], diag=True, method=method)
    for i in range(len(cs)):
        for j in range(i, len(cs)):
            if i == j and i == 0:
                continue
            term = inner(cs[i], cs[j], diag=True, method=method)
            total = total + (term if i == j else 2 * term)
    return total


def _bias_side(weight: list[Contribution], bias: list[Contribution], method: str) -> Literal["u", "v"] | None:
    """Which factor of a single ghost weight term the single bias term sums (``None``: no fold)."""
    if len(weight) != 1 or len(bias) != 1:
        return None  # a tied or repeated parameter keeps its pairwise products
    w, b = weight[0], bias[0]
    if not (isinstance(w, Outer) and isinstance(b, Outer)) or b.v is not None:
        return None
    if w.v is None or w.is_index or not _takes_ghost(w, w, method):
        return None
    if b.u is w.u:
        return "u"  # nn.Linear: weight [out, in] = sum_t g (x) a, bias sum_t g
    if b.u is w.v:
        return "v"  # HF Conv1D: weight [in, out] = sum_t a (x) g, bias sum_t g
    return None


def total_sq_norms(
    contribs: dict[str, list[Contribution]], method: NormMethod = "auto", clamp: bool = True
) -> Tensor:
    """``(B,)`` squared norm of the per-sample gradient over *all* parameters of ``contribs``.

    Equal to summing :func:`sq_norms` over the parameters, but a ``name.bias`` whose token sum is a factor of
    ``name.weight``'s ghost term (``nn.Linear``, HF ``Conv1D``) is folded into that term's products
    (:func:`_ghost_dense`, ``bias_on``), which saves the bias's own pass over the factor. ``clamp``: clip each
    parameter's (or folded pair's) sum at 0 first (the ghost identity can round a tiny norm below zero).

    Raises:
        ValueError: ``contribs`` is empty.
    """
    _check_method(method)
    folded: dict[str, Literal["u", "v"]] = {}
    for name, cs in contribs.items():
        if name.endswith(".weight") and (bias := contribs.get(name[: -len("weight")] + "bias")) is not None:
            side = _bias_side(cs, bias, method)
            if side is not None:
                folded[name] = side
    skipped = {name[: -len("weight")] + "bias" for name in folded}
    total = None
    for name, cs in contribs.items():
        if name in skipped:
            continue
        if name in folded:
            c = cs[0]
            assert isinstance(c, Outer)
            term = _ghost_dense(c, c, diag=True, bias_on=folded[name])  # (B,)
        else:
            term = sq_norms(cs, method)  # (B,)
        term = term.clamp_min(0) if clamp else term
        total = term if total is None else total + term
    if total is None:
        raise ValueError("total_sq_norms: no contributions")
    return total


def dots(cs1: list[Contribution], cs2: list[Contribution], method: NormMethod = "auto") -> Tensor:
    """``(B1, B2)`` inner products between ``sum(cs1)`` and ``sum(cs2)`` per sample pair."""
    total = None
    for c1 in cs1:
        for c2 in cs2:
            term = inner(c1, c2, diag=False, method=method)
            total = term if total is None else total + term
    assert total is not None
    return total
