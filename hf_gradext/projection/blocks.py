"""The layout of a projection: which weights are projected, their ``k_i x k_o`` and their slice of the row.

:func:`build_blocks` makes the :class:`LayerBlock` list of a new projector; :func:`check_blocks` refuses
metadata whose blocks do not fit the model at hand. Split from :mod:`hf_gradext.projection.projector` (which
re-exports :class:`LayerBlock`), whose module docstring explains tied weights and the metadata formats.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from hf_gradext.errors import UserFacingError
from hf_gradext.grad.registry import lookup
from hf_gradext.grad.selection import clean_name, unwrap_model
from hf_gradext.projection.matrices import layer_seed
from hf_gradext.projection.ranks import split_rank

logger = logging.getLogger("hf_gradext.projection.projector")  # the projector's log lines, as before
FORMAT = "hf_gradext.projection/2"
FORMAT_V1 = "hf_gradext.projection/1"  # read when unaffected by the fixes of version 2 (projector module doc)


@dataclass
class LayerBlock:
    """One projected weight and its slice of the output row (what ``metadata.json`` stores per layer)."""

    name: str  # the first module (named_modules order) owning the weight, in the unwrapped model
    type: str  # "linear" | "conv1d" | "embedding"
    weight_name: str  # named_parameters() name of the projected weight
    original_shape: list[int]
    layout: str  # "out_in" (nn.Linear) or "in_out" (Conv1D, Embedding)
    d_in: int
    d_out: int
    k_i: int
    k_o: int
    slice_start: int
    slice_end: int
    seed: int  # the layer seed derived from (proj_seed, name)
    tied_modules: list[str] = field(default_factory=list)  # e.g. ["lm_head"] sharing this weight


def _kind(module: nn.Module) -> str | None:
    """Block type of a module's ``weight`` from its registered family (``None``: no Kronecker form)."""
    spec = lookup(module)
    if spec is None:
        return None
    if spec.family == "embedding":
        return "embedding"
    if spec.family == "linear":
        # HF's Conv1D stores [in, out]; every other linear-family layer (nn.Linear, LoRA adapters, layers
        # registered by users) is taken as torch's [out, in]. Either way the rows are the projection of
        # the registry's gradient; the layout only names which factor is P_i.
        return "conv1d" if any(c.__name__ == "Conv1D" for c in type(module).__mro__) else "linear"
    return None


def weight_of(module: nn.Module) -> nn.Parameter | None:
    """The module's own 2-D ``weight`` parameter, if it has one."""
    w = module._parameters.get("weight") if hasattr(module, "_parameters") else None
    return w if isinstance(w, nn.Parameter) and w.dim() == 2 else None


def weight_owners(model: nn.Module) -> dict[int, list[str]]:
    """``{id(weight): [module names]}``: every module owning each 2-D weight, in ``named_modules`` order.

    Includes modules without a Kronecker form (their names tell why a shared weight cannot be projected).
    A tied parameter lists all its modules (GPT-2: ``["transformer.wte", "lm_head"]``).
    """
    owners: dict[int, list[str]] = {}
    for name, module in unwrap_model(model).named_modules():
        w = weight_of(module)
        if w is not None:
            owners.setdefault(id(w), []).append(clean_name(name))
    return owners


def build_blocks(
    model: nn.Module,
    selected: dict[str, nn.Module],
    *,
    layers: str,
    rank_total: int,
    rank_min: int,
    split: str,
    seed: int,
) -> list[LayerBlock]:
    """The blocks of the ``selected`` modules' weights, in ``named_modules`` order, with contiguous slices.

    A tied weight gets one block naming every module that uses it; weights without a Kronecker form, frozen
    ones, and heads tied to an unselected embedding table are skipped (logged). ``layers`` only names the
    selection in the error raised when nothing is left.
    """
    root = unwrap_model(model)
    modules = {clean_name(n): m for n, m in root.named_modules()}
    order = {n: i for i, n in enumerate(modules)}
    owners = weight_owners(root)
    names = {id(p): clean_name(n) for n, p in root.named_parameters()}
    blocks: dict[int, LayerBlock] = {}
    skipped = []
    for name in sorted(selected, key=order.__getitem__):
        weight = weight_of(selected[name])
        if _kind(selected[name]) is None or weight is None or not weight.requires_grad:
            skipped.append(name)
            continue
        if id(weight) in blocks:
            continue  # a tied weight: its block is already there, with every module using it
        users = owners[id(weight)]
        untouched = [u for u in users if _kind(modules[u]) is None]
        if untouched:
            skipped.append(f"{name} (its weight is also used by {', '.join(untouched)}, which has no math)")
            continue
        tables = [u for u in users if _kind(modules[u]) == "embedding" and u not in selected]
        if tables:
            # An embedding table is projected only on request (it is V x d); a head tied to it alone
            # would project only part of its parameter's gradient.
            skipped.append(f"{name} (tied to {', '.join(tables)}: pass include_embeddings)")
            continue
        block = _block(
            users[0], modules[users[0]], names[id(weight)], users[1:], rank_total, rank_min, split, seed
        )
        blocks[id(weight)] = block
    if skipped:
        logger.info("not projected (no Kronecker form or tied): %s", ", ".join(skipped))
    if not blocks:
        raise UserFacingError(
            f"--proj_layers={layers!r} selects no Linear/Conv1D weight (only {', '.join(skipped)}); "
            "select attention/MLP layers or pass --include_embeddings"
        )
    ordered = sorted(blocks.values(), key=lambda b: order[b.name])
    start = 0
    for block in ordered:
        block.slice_start, start = start, start + block.k_i * block.k_o
        block.slice_end = start
    return ordered


def _block(
    name: str,
    module: nn.Module,
    weight_name: str,
    tied: list[str],
    rank_total: int,
    rank_min: int,
    split: str,
    seed: int,
) -> LayerBlock:
    kind = _kind(module)
    assert kind is not None
    shape = list(module.weight.shape)
    if kind == "linear":
        d_out, d_in, layout = shape[0], shape[1], "out_in"
    else:  # Conv1D weight (in, out); Embedding (V, d) treated as in=V, out=d
        d_in, d_out, layout = shape[0], shape[1], "in_out"
    k_i, k_o = split_rank(d_in, d_out, rank_total, rank_min, split)
    return LayerBlock(
        name, kind, weight_name, shape, layout, d_in, d_out, k_i, k_o, 0, 0, layer_seed(seed, name),
        list(tied),
    )  # fmt: skip


def check_blocks(blocks: list[LayerBlock], model: nn.Module, fmt: str) -> None:
    """Refuse metadata whose blocks do not fit ``model``, or whose version-1 rows the fixes of version 2
    changed (a tied weight missing a module, an embedding with ``padding_idx``)."""
    root = unwrap_model(model)
    modules = {clean_name(n): m for n, m in root.named_modules()}
    owners = weight_owners(root)
    for b in blocks:
        module = modules.get(b.name)
        weight = weight_of(module) if module is not None else None
        if weight is None or list(weight.shape) != b.original_shape:
            raise UserFacingError(
                f"metadata layer {b.name} {b.original_shape} does not exist in this model with that shape; "
                "load the model the projection was made with"
            )
        users = owners[id(weight)]
        if users[0] != b.name or users[1:] != list(b.tied_modules):
            if fmt == FORMAT_V1:
                raise UserFacingError(
                    f"metadata format {fmt!r}: layer {b.name} was projected without {', '.join(users[1:])}, "
                    f"which share its weight (a bug fixed in {FORMAT!r}); re-run the projection"
                )
            raise UserFacingError(
                f"metadata layer {b.name} shares its weight with {b.tied_modules or 'no module'}, but in this "
                f"model with {users[1:] or 'no module'}; load the model the projection was made with"
            )
        if fmt == FORMAT_V1 and getattr(module, "padding_idx", None) is not None:
            raise UserFacingError(
                f"metadata format {fmt!r}: embedding {b.name} has padding_idx={module.padding_idx}, whose row "
                f"version 1 did not mask (fixed in {FORMAT!r}); re-run the projection"
            )
