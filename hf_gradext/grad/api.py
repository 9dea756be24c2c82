"""Public one-call API: per-sample gradients, their norms, and gradient similarity.

Each call runs ONE forward + backward of ``model`` on the batch with the capture engine armed and every
parameter temporarily frozen, so the model's ordinary ``.grad`` buffers are never touched. The loss is
computed here, per sample, in at least float32: ``L_i`` = mean cross-entropy over sample ``i``'s targets
with ``labels != -100`` (shifted by one for causal LMs, as HF does); padding contributes nothing. The
model's current train/eval mode is kept (call ``model.eval()`` to switch dropout off).

An empty batch (``B = 0``) is not an error: every result has a leading dim of 0 (``(0, *shape)`` gradients,
``(0,)`` norms, ``(0, Nb)`` similarities), so callers that split data into possibly empty shards need no
special case.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from hf_gradext.errors import UserFacingError
from hf_gradext.grad.capture import CaptureEngine
from hf_gradext.grad.factors import (
    NORM_METHODS,
    Contribution,
    Dense,
    Materialized,
    NormMethod,
    Outer,
    dots,
    materialize_sum,
    sq_norms,
    total_sq_norms,
)
from hf_gradext.grad.loss_scaling import IGNORE_INDEX, LossScale, shifts_labels
from hf_gradext.grad.selection import clean_name, unwrap_model
from hf_gradext.grad.sparse import SparseRowGrad

PerSampleLoss = Callable[[Any, Mapping[str, Any]], Tensor]


def token_mean_losses(logits: Tensor, labels: Tensor, shift: bool) -> Tensor:
    """``(B,)`` per-sample mean token cross-entropy over ``labels != -100`` (0 for samples with none).

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)``; with ``shift`` the logit at ``t`` predicts ``labels[t + 1]``.
        shift: causal-LM shift.
    """
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits  # as HF upcasts
    tok = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels.reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(labels.shape)  # (B, T)
    n = labels.ne(IGNORE_INDEX).sum(1).to(tok.device)  # (B,)
    return tok.sum(1) / n.clamp_min(1)


def _batch_size(batch: Mapping[str, Any]) -> int:
    ids = batch.get("input_ids", batch.get("inputs_embeds"))
    return int(ids.shape[0]) if ids is not None else int(batch["labels"].shape[0])


def _contributions(
    model: nn.Module,
    batch: Mapping[str, Any],
    layers: str,
    unsupported: str,
    loss_fn: PerSampleLoss | None,
    dtype: torch.dtype | None = None,
) -> dict[str, list[Contribution]]:
    """One armed forward + backward of ``model`` on ``batch``: ``{parameter name: contributions}``."""
    if "labels" not in batch and loss_fn is None:
        raise UserFacingError("per-sample gradients need 'labels' in the batch (or a loss_fn)")
    engine = CaptureEngine(model, layers, keep=True, weight_grads=False, unsupported=unsupported)
    batch_size = _batch_size(batch)
    if batch_size == 0:
        # Nothing to run: many models cannot even take an empty batch (HF's GPT-2 reshapes its attention
        # mask with -1), and the answer's shapes are known from the selection alone.
        engine.remove()
        return _empty_contributions(engine, dtype)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    try:
        with engine.capture(LossScale.identity(batch_size, batch.get("attention_mask"))):
            outputs = model(**inputs)
            if loss_fn is not None:
                losses = loss_fn(outputs, batch)
            else:
                logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs.logits
                losses = token_mean_losses(logits, batch["labels"], shifts_labels(model))
            if losses.shape != (batch_size,):
                raise UserFacingError(f"loss_fn must return one loss per sample, shape ({batch_size},)")
            losses.sum().backward()  # gradient of sum_i L_i: no rescaling needed
    finally:
        engine.remove()
    contribs = engine.contributions(dtype)
    if not contribs:
        raise UserFacingError(
            f"no selected layer ({layers!r}) received a gradient from the loss; check the layer selection"
        )
    return contribs


def _empty_contributions(engine: CaptureEngine, dtype: torch.dtype | None) -> dict[str, list[Contribution]]:
    """What an empty batch contributes, in the layout a non-empty one would have (names, kinds, shapes).

    Embedding tables get an empty index term (so results stay :class:`SparseRowGrad` unless tied to a
    dense term, as for ``B > 0``); every other trainable parameter of a selected module a ``(0, *shape)``
    dense term.
    """
    names = {id(p): clean_name(n) for n, p in unwrap_model(engine.model).named_parameters()}
    out: dict[str, list[Contribution]] = {}
    for module_name, module in engine.modules.items():
        family = engine.specs[module_name].family
        for local, p in module.named_parameters(recurse=False):
            if not engine.is_trainable(p):
                continue
            dt = dtype or torch.promote_types(p.dtype, torch.float32)
            c: Contribution
            if family == "embedding" and local == "weight":
                ids = torch.zeros((0, 0), dtype=torch.long, device=p.device)  # (B=0, T=0)
                c = Outer(u=ids, v=torch.zeros((0, 0, p.shape[1]), dtype=dt, device=p.device), m=p.shape[0])
            else:
                c = Dense(torch.zeros((0, *p.shape), dtype=dt, device=p.device))  # (0, *shape)
            out.setdefault(names[id(p)], []).append(c)
    return out


def per_sample_gradients(
    model: nn.Module,
    batch: Mapping[str, Any],
    layers: str = "all",
    dtype: torch.dtype = torch.float32,
    *,
    unsupported: str = "error",
    loss_fn: PerSampleLoss | None = None,
) -> dict[str, Tensor | SparseRowGrad]:
    """Exact per-sample gradients of each sample's own mean token loss.

    Args:
        model: a HF model (or any module returning ``logits``), possibly peft/DDP-wrapped.
        batch: ``input_ids``, ``labels`` (``-100`` = ignored), optional ``attention_mask``...
        layers: module selection (``all``, ``attn``, ``mlp``, ``embed``, ``norm``, ``lora``, regexes, commas).
        dtype: dtype of the math and of the results.
        unsupported: ``"error"`` or ``"torch.func"`` for trainable modules without registered math.
        loss_fn: optional ``fn(outputs, batch) -> (B,)`` per-sample losses replacing the token mean.

    Returns:
        ``{parameter name: (B, *param.shape)}``; embedding tables a :class:`SparseRowGrad` (``.to_dense()``)
        unless tied to a dense contribution (GPT-2 ``wte`` + ``lm_head``: dense sum of both).
    """
    out: dict[str, Materialized] = {}
    for name, cs in _contributions(model, batch, layers, unsupported, loss_fn, dtype).items():
        m = materialize_sum(cs)
        out[name] = m.to(dtype) if isinstance(m, Tensor) else m
    return out


def _check_method(method: str) -> None:
    if method not in NORM_METHODS:
        raise UserFacingError(f"method={method!r}: use one of {', '.join(NORM_METHODS)}")


def per_sample_grad_norms(
    model: nn.Module,
    batch: Mapping[str, Any],
    layers: str = "all",
    *,
    per_layer: bool = False,
    unsupported: str = "error",
    loss_fn: PerSampleLoss | None = None,
    method: NormMethod = "auto",
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """``(B,)`` L2 norms of the per-sample gradients over the selected parameters, without materializing
    them where the ghost identity is cheaper (``2 T^2 < d_in d_out``).

    With ``per_layer=True`` also returns ``{parameter name: (B,) norm}`` (squares sum to the total).
    ``method`` (``"auto"``, ``"ghost"``, ``"materialize"``) overrides the per-layer choice, e.g. to compare
    both paths; biases are always exact token sums. Accuracy of the ghost path: :mod:`hf_gradext.grad.factors`.
    """
    _check_method(method)
    contribs = _contributions(model, batch, layers, unsupported, loss_fn)
    if not per_layer:
        return total_sq_norms(contribs, method).sqrt()  # biases folded into their weights' ghost terms
    per = {name: sq_norms(cs, method).clamp_min(0) for name, cs in contribs.items()}
    total = torch.stack(list(per.values())).sum(0).sqrt()
    return total, {name: sq.sqrt() for name, sq in per.items()}


def gradient_similarity(
    model: nn.Module,
    batch_a: Mapping[str, Any],
    batch_b: Mapping[str, Any] | None = None,
    layers: str = "all",
    kind: str = "cosine",
    *,
    unsupported: str = "error",
    loss_fn: PerSampleLoss | None = None,
    method: NormMethod = "auto",
) -> Tensor:
    """``(Na, Nb)`` similarity between per-sample gradients of two batches (``batch_b=None``: a vs a).

    ``kind="dot"``: inner products; ``"cosine"``: divided by both norms (0 where a norm is 0).
    ``method`` as in :func:`per_sample_grad_norms`.
    """
    if kind not in ("cosine", "dot"):
        raise UserFacingError(f"gradient_similarity kind={kind!r}: use 'cosine' or 'dot'")
    _check_method(method)
    ca = _contributions(model, batch_a, layers, unsupported, loss_fn)
    cb = ca if batch_b is None else _contributions(model, batch_b, layers, unsupported, loss_fn)
    shared = [name for name in ca if name in cb]
    if not shared:
        raise UserFacingError("gradient_similarity: the two batches share no parameter with a gradient")
    sim = sum(dots(ca[name], cb[name], method) for name in shared)
    assert isinstance(sim, Tensor)
    if kind == "dot":
        return sim
    na = total_sq_norms(ca, method, clamp=False).clamp_min(0).sqrt()  # (Na,)
    nb = na if batch_b is None else total_sq_norms(cb, method, clamp=False).clamp_min(0).sqrt()  # (Nb,)
    denom = na[:, None] * nb[None, :]
    return torch.where(denom > 0, sim / denom.clamp_min(torch.finfo(denom.dtype).tiny), torch.zeros_like(sim))
