"""Load and analyze collected per-sample gradients (shards written by ``PerSampleGradientCallback``).

Samples are identified by ``(step, rank, sample)``; every tensor returned is aligned with
``CollectedGradients.samples``. Norms exist for ``save=norms`` and ``save=full``; gradients, similarity
matrices and the q/k/v split need ``save=full``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from hf_gradext.collection.sink import PREFIX
from hf_gradext.collection.stats import layer_group, norm_summary
from hf_gradext.errors import UserFacingError
from hf_gradext.grad.sparse import SparseRowGrad
from hf_gradext.store import list_shards, read_shard, read_shard_header

GROUP_NAMES = ("attn", "mlp", "embed", "norm", "other")


@dataclass
class CollectedGradients:
    """Per-sample gradients and norms loaded from a collection directory.

    Attributes:
        samples: one dict per sample ``{"step", "rank", "sample", "example_id"}``, sorted.
        norms: layer -> ``(N,)`` per-sample gradient norm (NaN where a sample lacks the layer).
        grads: parameter -> ``(N, *shape)`` dense tensor, or a :class:`SparseRowGrad` for embeddings.
        params: layer -> its parameter names (full mode).
        groups: layer -> group (attn/mlp/embed/norm/other).
    """

    samples: list[dict[str, Any]]
    norms: dict[str, Tensor] = field(default_factory=dict)
    grads: dict[str, Tensor | SparseRowGrad] = field(default_factory=dict)
    params: dict[str, list[str]] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return list(self.norms)

    @property
    def steps(self) -> list[int]:
        return sorted({s["step"] for s in self.samples})

    def step_mask(self, step: int) -> Tensor:
        return torch.tensor([s["step"] == step for s in self.samples], dtype=torch.bool)


def _layer_filter(layers: str | Iterable[str] | None, groups: dict[str, str]):
    if layers is None:
        return lambda name: True
    tokens = [t.strip() for t in (layers.split(",") if isinstance(layers, str) else layers) if t.strip()]
    regexes = [re.compile(t) for t in tokens if t not in GROUP_NAMES and t != "all"]
    wanted_groups = {t for t in tokens if t in GROUP_NAMES}
    if "all" in tokens:
        return lambda name: True
    return lambda name: (
        groups.get(name, layer_group(name)) in wanted_groups or any(rx.search(name) for rx in regexes)
    )


def load_gradients(
    directory: str | os.PathLike,
    step: int | Iterable[int] | None = None,
    layers: str | Iterable[str] | None = None,
    with_grads: bool = True,
) -> CollectedGradients:
    """Load collected gradients.

    Args:
        directory: the collection directory (``--gradient_collection_dir``).
        step: one optimizer step, several, or ``None`` for all.
        layers: ``None`` (all), or groups (attn/mlp/embed/norm) and/or regexes on layer names, as a
            comma string or a list.
        with_grads: also load full gradients when present (``False``: norms only, much less memory).

    Raises:
        UserFacingError: no shards in ``directory``, or nothing matches ``step`` / ``layers``.
    """
    shards = list_shards(directory, PREFIX)
    if not shards:
        raise UserFacingError(
            f"no gradient shards ({PREFIX}-rank*.safetensors) in {directory}; check the path"
        )
    steps = None if step is None else ({int(step)} if isinstance(step, int) else {int(s) for s in step})
    headers = []
    groups: dict[str, str] = {}
    for info in shards:
        rows, meta = read_shard_header(info.path)
        if steps is not None and meta.get("step") not in steps:
            continue
        groups.update(meta.get("groups", {}))
        headers.append((info, rows, meta))
    keep = _layer_filter(layers, groups)
    # Pass 1: the sample list and the layer set.
    sample_keys: set[tuple[int, int, int]] = set()
    example: dict[tuple[int, int, int], Any] = {}
    layer_names: list[str] = []
    for _, rows, _ in headers:
        for r in rows:
            if not keep(r["layer"]):
                continue
            key = (r["step"], r["rank"], r["sample"])
            sample_keys.add(key)
            example[key] = r.get("example_id")
            if r["layer"] not in layer_names:
                layer_names.append(r["layer"])
    if not sample_keys:
        raise UserFacingError(
            f"no collected rows in {directory} match step={step} layers={layers}; "
            f"steps on disk: {sorted({m.get('step') for _, _, m in headers}) or 'none for that step'}"
        )
    # Model order (h.2 before h.10), not the backward order the rows were written in.
    layer_names.sort(key=lambda name: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)])
    order = sorted(sample_keys)
    pos = {k: i for i, k in enumerate(order)}
    n = len(order)
    out = CollectedGradients(
        samples=[{"step": s, "rank": r, "sample": j, "example_id": example[(s, r, j)]} for s, r, j in order],
        norms={layer: torch.full((n,), float("nan")) for layer in layer_names},
        groups={layer: groups.get(layer, layer_group(layer)) for layer in layer_names},
    )
    sparse_parts: dict[str, list[tuple[Tensor, Tensor, Tensor]]] = {}
    sparse_rows: dict[str, int] = {}
    # Pass 2: tensors.
    for info, rows, meta in headers:
        rows = [r for r in rows if keep(r["layer"])]
        if not rows:
            continue
        params = meta.get("params", {}) if with_grads else {}
        tensors, _, _ = read_shard(info.path)
        for layer, names in params.items():
            if keep(layer):
                out.params.setdefault(layer, [p for p in names])
        for r in rows:
            i, layer, off = pos[(r["step"], r["rank"], r["sample"])], r["layer"], r["offset"]
            out.norms[layer][i] = tensors[f"norm::{layer}"][off].float()
            for pname in params.get(layer, []):
                if pname in tensors:
                    t = tensors[pname]
                    if pname not in out.grads:
                        out.grads[pname] = torch.zeros((n, *t.shape[1:]), dtype=t.dtype)
                    out.grads[pname][i] = t[off]
                elif f"{pname}::values" in tensors:
                    mask = tensors[f"{pname}::sample"] == off
                    rows_idx, vals = tensors[f"{pname}::row"][mask], tensors[f"{pname}::values"][mask]
                    sample_idx = torch.full_like(rows_idx, i)
                    sparse_parts.setdefault(pname, []).append((sample_idx, rows_idx, vals))
                    sparse_rows[pname] = int(tensors[f"{pname}::num_rows"])
    for pname, parts in sparse_parts.items():
        s_idx, r_idx, vals = (torch.cat(x) for x in zip(*parts))
        num_rows = sparse_rows[pname] or int(r_idx.max().item()) + 1
        out.grads[pname] = SparseRowGrad(s_idx, r_idx, vals, n, num_rows)
    return out


# --------------------------------------------------------------------------- statistics
def layer_statistics(data: CollectedGradients, step: int | None = None) -> dict[str, dict[str, float]]:
    """Per layer: summary of the per-sample norms (mean, std, min, max, percentiles, spread), over all
    steps or one ``step``."""
    mask = data.step_mask(step) if step is not None else torch.ones(len(data.samples), dtype=torch.bool)
    table = {}
    for layer, norms in data.norms.items():
        x = norms[mask]
        x = x[~torch.isnan(x)]
        table[layer] = {"n": float(x.numel()), **norm_summary(x)}
    return table


def norms_over_steps(data: CollectedGradients, stat: str = "mean") -> tuple[list[str], list[int], Tensor]:
    """``(layers, steps, M)`` with ``M[l, s]`` the mean (or median, ``stat="median"``) per-sample norm."""
    steps = data.steps
    mat = torch.full((len(data.norms), len(steps)), float("nan"), dtype=torch.float64)
    for li, norms in enumerate(data.norms.values()):
        for si, s in enumerate(steps):
            x = norms[data.step_mask(s)].double()
            x = x[~torch.isnan(x)]
            if x.numel():
                mat[li, si] = x.mean() if stat == "mean" else x.median()
    return list(data.norms), steps, mat


# --------------------------------------------------------------------------- similarity
def _require_grads(data: CollectedGradients) -> None:
    if not data.grads:
        raise UserFacingError(
            "similarity and q/k/v summaries need full gradients; collect with --gradient_collection_save full"
        )


def _dots(x: Tensor | SparseRowGrad) -> Tensor:
    if isinstance(x, SparseRowGrad):
        return x.dots(x).double()
    flat = x.flatten(1).double()  # (N, P)
    return flat @ flat.T


def similarity_matrix(
    data: CollectedGradients, kind: str = "cosine", layer: str | None = None, step: int | None = None
) -> Tensor:
    """``(N, N)`` dot products or cosines between per-sample gradients, of one ``layer`` (module name)
    or over every loaded parameter (``None``); restricted to one ``step`` if given."""
    _require_grads(data)
    if kind not in ("cosine", "dot"):
        raise UserFacingError(f"similarity kind {kind!r} is not valid; choose cosine or dot")
    if layer is None:
        names = list(data.grads)
    else:
        if layer not in data.params:
            raise UserFacingError(
                f"layer {layer!r} has no stored gradients; choose one of {', '.join(data.params)}"
            )
        names = data.params[layer]
    gram = None
    for name in names:
        d = _dots(data.grads[name])
        gram = d if gram is None else gram + d
    assert gram is not None
    if step is not None:
        mask = data.step_mask(step)
        gram = gram[mask][:, mask]
    if kind == "dot":
        return gram
    norms = gram.diagonal().clamp_min(0).sqrt()
    return gram / (norms[:, None] * norms[None, :]).clamp_min(1e-300)


# --------------------------------------------------------------------------- attention
def _qkv_split(name: str, grad: Tensor) -> list[Tensor]:
    """Split a fused ``c_attn`` gradient into q, k, v along the output dimension.

    HF GPT-2 ``Conv1D`` stores the weight ``[in, 3 d]`` (output last) and the bias ``[3 d]``.
    """
    return list(grad.chunk(3, dim=-1))  # 3 x (N, in, d) or 3 x (N, d)


def attention_summary(data: CollectedGradients) -> dict[str, dict[str, float]]:
    """Per attention layer: norm summary; for fused ``c_attn`` layers with stored gradients also the
    mean per-sample norm of the q, k and v parts and their share of the squared norm."""
    out: dict[str, dict[str, float]] = {}
    for layer, norms in data.norms.items():
        if data.groups.get(layer) != "attn":
            continue
        x = norms[~torch.isnan(norms)]
        summary = {f"norm_{k}": v for k, v in norm_summary(x).items()}
        if layer.endswith("c_attn") and layer in data.params:
            sq = {"q": 0.0, "k": 0.0, "v": 0.0}
            sq_t: dict[str, Tensor] = {}
            for pname in data.params[layer]:
                grad = data.grads.get(pname)
                if not isinstance(grad, Tensor) or grad.shape[-1] % 3:
                    continue
                for part, piece in zip("qkv", _qkv_split(pname, grad)):
                    term = piece.flatten(1).double().pow(2).sum(1)  # (N,)
                    sq_t[part] = sq_t[part] + term if part in sq_t else term
            total = sum(t.sum() for t in sq_t.values())
            for part, t in sq_t.items():
                sq[part] = t.sqrt().mean().item()
                summary[f"{part}_norm_mean"] = sq[part]
                summary[f"{part}_sq_share"] = (t.sum() / total).item() if total > 0 else 0.0
        out[layer] = summary
    return out
