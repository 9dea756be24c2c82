"""``KroneckerProjector``: per-sample projected gradients of selected layers, from one backward.

Each projected 2-D weight *parameter* (``nn.Linear`` / HF ``Conv1D`` weights, LoRA adapters, and with
``include_embeddings`` the ``nn.Embedding`` tables) owns a slice ``[slice_start, slice_end)`` of the
output row holding ``vec(P_o G_i P_i^T)`` (see :mod:`hf_gradext.projection.kronecker`). Biases and norm
layers are not projected.

The per-layer math is the per-sample gradient registry's (:mod:`hf_gradext.grad.registry`): every captured
module call becomes the registry's contributions (``Outer`` / ``Dense``), which are projected without
building the gradient. So whatever the registry knows, projection knows too: embedding rows at
``padding_idx`` get no gradient, peft LoRA adapters are plain linears, and a parameter used by several
modules (GPT-2's tied ``wte`` / ``lm_head``) is projected as the sum of all its uses: every module owning
it is hooked, whichever of them the layer selection named. The capture engine
(:mod:`hf_gradext.grad.capture`) supplies the layer inputs ``a`` and output gradients ``g`` already rescaled
to the gradient of each sample's own mean token loss, with padding rows exactly zero.

Metadata format ``hf_gradext.projection/2``. Version 1 (before the registry route) missed a tied weight's
other modules under a partial selection (``layers="mlp,attn"`` with ``include_embeddings``: the
``lm_head`` half of ``wte``) and did not mask ``padding_idx``; version-1 metadata is still read when none
of its blocks is affected, and refused with the reason otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_gradext.errors import UserFacingError
from hf_gradext.grad.capture import CaptureEngine
from hf_gradext.grad.loss_scaling import LossScale
from hf_gradext.grad.registry import LayerSpec, evaluate_math, lookup
from hf_gradext.grad.selection import (
    clean_name,
    module_groups,
    select_modules,
    trainable_modules,
    unwrap_model,
)
from hf_gradext.integrations.loss import shifts_labels
from hf_gradext.projection.blocks import (
    FORMAT,
    FORMAT_V1,
    LayerBlock,
    build_blocks,
    check_blocks,
    weight_of,
)
from hf_gradext.projection.kronecker import naive_project, project_contribution
from hf_gradext.projection.matrices import METHODS, make_factors
from hf_gradext.projection.ranks import SPLIT_RULES

logger = logging.getLogger(__name__)


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("hf_gradext")
    except Exception:  # pragma: no cover - not installed
        return "unknown"


class KroneckerProjector:
    """Kronecker (LoRA-style) projection of per-sample gradients.

    Args:
        model: the model (plain, DDP-wrapped or peft); names are those of the unwrapped model.
        layers: selection as in :func:`hf_gradext.grad.selection.select_modules` (``"mlp,attn"``, a
            regex like ``"transformer.h.0"``...); the 2-D weights of the selected modules with registered
            Linear/Conv1D/Embedding math are projected (embedding tables only when selected: ``"all"``,
            ``"embed"``, a regex, or ``include_embeddings``).
        rank_total: target ``k_i * k_o`` per layer. rank_min: lower bound of each factor.
        seed: projection seed. method: the factors' distribution, ``"rademacher"`` (+-1 entries, default),
            ``"gaussian"`` (the default before 0.2) or ``"row_orthonormal"`` (see
            :mod:`hf_gradext.projection.matrices`). row_orthonormal: ``True`` is ``method="row_orthonormal"``.
        split: how ``rank_total`` is split into ``k_i x k_o``: ``"balanced"`` (square-most, default) or
            ``"cost"`` (cheapest; the default before 0.2), see :mod:`hf_gradext.projection.ranks`.
        include_embeddings: also project the trainable ``nn.Embedding`` tables (with every other module
            sharing their weight, e.g. a tied ``lm_head``).
        dtype: storage dtype recorded in the metadata (rows returned by :meth:`project` are float32).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str = "mlp,attn",
        rank_total: int = 256,
        rank_min: int = 8,
        seed: int = 42,
        row_orthonormal: bool = False,
        include_embeddings: bool = False,
        dtype: str = "bfloat16",
        *,
        method: str | None = None,
        split: str = "balanced",
        _blocks: list[LayerBlock] | None = None,
    ) -> None:
        self.model = model
        self.layers, self.rank_total, self.rank_min = layers, rank_total, rank_min
        if method is None:
            method = "row_orthonormal" if row_orthonormal else "rademacher"
        elif row_orthonormal and method != "row_orthonormal":
            raise ValueError(f"row_orthonormal=True contradicts method={method!r}; pass one of them")
        if method not in METHODS:
            raise ValueError(f"method={method!r}: use one of {', '.join(METHODS)}")
        if split not in SPLIT_RULES:
            raise ValueError(f"split={split!r}: use one of {', '.join(SPLIT_RULES)}")
        self.seed, self.method, self.split = seed, method, split
        self.row_orthonormal = method == "row_orthonormal"
        self.include_embeddings, self.dtype = include_embeddings, dtype
        self.blocks = (
            _blocks
            if _blocks is not None
            else build_blocks(
                model,
                self._selected(),
                layers=layers,
                rank_total=rank_total,
                rank_min=rank_min,
                split=split,
                seed=seed,
            )
        )
        modules = {clean_name(n): m for n, m in unwrap_model(model).named_modules()}
        # Every module using a projected weight is hooked and routed to that weight's block.
        self._route: dict[str, LayerBlock] = {}
        self._specs: dict[str, LayerSpec] = {}
        for block in self.blocks:
            for name in (block.name, *block.tied_modules):
                spec = lookup(modules[name])
                if spec is None:
                    raise UserFacingError(f"{name} ({type(modules[name]).__name__}) has no registered math")
                self._route[name], self._specs[name] = block, spec
        self._projected = {id(weight_of(modules[b.name])) for b in self.blocks}
        self._factors = {
            b.name: make_factors(b.name, b.d_in, b.d_out, b.k_i, b.k_o, seed, self.method)
            for b in self.blocks
        }
        self._device_factors: dict[
            tuple[str, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]
        ] = {}
        self._partial: dict[str, torch.Tensor] = {}
        self._engine: CaptureEngine | None = None
        self.last_loss_tensor: torch.Tensor | None = None  # loss of the last project() batch, on its device
        self._shift: bool | None = None  # whether the model's loss shifts labels (asked on first use)
        # Set when Adam preconditioning is folded into the factors (preconditioning.fold_from_args): then the
        # factors are P diag(.) and the metadata records which state made them.
        self.preconditioning: dict[str, Any] | None = None

    # ------------------------------------------------------------------ layout
    def _selected(self) -> dict[str, nn.Module]:
        selected = select_modules(self.model, self.layers)
        if self.include_embeddings:
            # The trainable tables only: under peft the embeddings are frozen and nothing is added.
            tables = {
                n: m for n, m in trainable_modules(self.model).items() if "embed" in module_groups(n, m)
            }
            if not tables:
                logger.info("include_embeddings: the model has no trainable embedding table")
            selected.update(tables)
        return selected

    @property
    def dim(self) -> int:
        """Total projected dimension D."""
        return self.blocks[-1].slice_end

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P_i, P_o)`` of layer ``name`` in float64 on CPU."""
        return self._factors[name]

    def _on_device(
        self, name: str, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (name, device, dtype)
        if key not in self._device_factors:
            p_in, p_out = self._factors[name]
            self._device_factors[key] = (p_in.to(device, dtype), p_out.to(device, dtype))
        return self._device_factors[key]

    # ------------------------------------------------------------------ metadata
    def metadata(self) -> dict[str, Any]:
        """Everything needed to rebuild every matrix (written as ``metadata.json``).

        With folded Adam preconditioning it also holds ``preconditioning`` (source, mode, power, eps, step,
        ``state_sha256``); :meth:`from_metadata` rebuilds the plain matrices ``P`` only.
        """
        meta = {
            "format": FORMAT,
            "package_version": _package_version(),
            "proj_layers": self.layers,
            "proj_rank_total": self.rank_total,
            "proj_rank_min": self.rank_min,
            "proj_seed": self.seed,
            "proj_method": self.method,
            "proj_dtype": self.dtype,
            "include_embeddings": self.include_embeddings,
            "seed_rule": "layer seed = first 8 bytes (little endian, 63 bits) of sha256(f'{proj_seed}:{name}'); "
            "CPU torch.Generator; P_i (k_i, d_in) then P_o (k_o, d_out) drawn as float32 randn",
            "row_layout": "per layer vec(P_o G P_i^T) row-major over (k_o, k_i), G as (d_out, d_in)",
            "total_proj_dim": self.dim,
            "layers": [asdict(b) for b in self.blocks],
        }
        if self.method == "rademacher":
            meta["seed_rule"] += "; rademacher: signs 2 * randint(0, 2) - 1 (int64) in place of randn"
        # Absent for cost: directories from before the key (all cost) keep their settings.
        if self.split != "cost":
            meta["proj_split"] = self.split
        if self.preconditioning is not None:  # absent when off: older directories keep their settings
            meta["preconditioning"] = dict(self.preconditioning)
        return meta

    @classmethod
    def from_metadata(
        cls, source: str | os.PathLike | Mapping[str, Any], model: nn.Module
    ) -> KroneckerProjector:
        """Rebuild the identical projector from ``metadata.json`` (a path, its directory, or the dict)."""
        if isinstance(source, Mapping):
            meta = dict(source)
        else:
            path = Path(source)
            path = path / "metadata.json" if path.is_dir() else path
            if not path.is_file():
                raise UserFacingError(f"{path} not found; pass a projection directory or its metadata.json")
            meta = json.loads(path.read_text())
        if meta.get("format") not in (FORMAT, FORMAT_V1):
            raise UserFacingError(
                f"metadata format {meta.get('format')!r} is not {FORMAT!r}; re-run the projection"
            )
        if meta.get("proj_method") not in METHODS:
            raise UserFacingError(
                f"metadata proj_method {meta.get('proj_method')!r} is not one this hf_gradext knows "
                f"({', '.join(METHODS)}); use the hf_gradext version that wrote it or re-run the projection"
            )
        blocks = [LayerBlock(**b) for b in meta["layers"]]
        check_blocks(blocks, model, meta["format"])
        return cls(
            model,
            layers=meta["proj_layers"],
            rank_total=meta["proj_rank_total"],
            rank_min=meta["proj_rank_min"],
            seed=meta["proj_seed"],
            method=meta["proj_method"],
            split=meta.get("proj_split", "cost"),
            include_embeddings=meta["include_embeddings"],
            dtype=meta.get("proj_dtype", "bfloat16"),
            _blocks=blocks,
        )

    # ------------------------------------------------------------------ capture path
    def capture_layers(self) -> str:
        """Selection string of exactly the modules to hook (every module using a projected weight)."""
        return ",".join(f"^{re.escape(n)}$" for n in self._route)

    def make_engine(self, weight_grads: bool = False) -> CaptureEngine:
        """A capture engine on exactly the modules this projector needs, feeding :meth:`on_capture`."""
        return CaptureEngine(
            self.model,
            self.capture_layers(),
            on_capture=self.on_capture,
            keep=False,
            weight_grads=weight_grads,
        )

    def on_capture(self, name: str, module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> None:
        """Engine callback: add this module call's projected contribution to its weight's block.

        The contribution is the registry's (``padding_idx`` masking, LoRA, tied heads included), asked for
        the projected weight only: biases are not projected, so their terms are never formed.
        """
        block = self._route.get(name)
        if block is None:
            return  # a module this projector does not project (an engine hooking more than it needs)
        contribs = evaluate_math(self._specs[name].math, module, a, g, trainable=self._is_projected)
        contrib = contribs.get("weight")
        if contrib is None:
            return
        p_in, p_out = self._on_device(
            block.name, g.device, torch.float64 if g.dtype == torch.float64 else torch.float32
        )
        part = project_contribution(contrib, p_in, p_out, block.layout)  # (B, k_o * k_i)
        prev = self._partial.get(block.name)
        self._partial[block.name] = part if prev is None else prev + part

    def _is_projected(self, param: nn.Parameter) -> bool:
        # The registry's "trainable?" question, answered as "projected?": independent of requires_grad,
        # which a weight_grads=False engine clears while it is armed.
        return id(param) in self._projected

    @property
    def last_loss(self) -> float:
        """Mean token loss of the batch :meth:`project` saw last (reading it waits for the GPU)."""
        return float("nan") if self.last_loss_tensor is None else float(self.last_loss_tensor)

    def reset(self) -> None:
        """Forget partial blocks (start of a new batch)."""
        self._partial = {}

    def collect(self) -> torch.Tensor:
        """Concatenate the blocks captured since :meth:`reset` into (B, D) rows, then reset.

        A block that received nothing (e.g. a layer skipped by the forward) is zero.
        """
        if not self._partial:
            raise RuntimeError("nothing was captured: run a forward + backward with the engine armed")
        ref = next(iter(self._partial.values()))
        parts = [self._partial.get(b.name, ref.new_zeros(ref.shape[0], b.k_o * b.k_i)) for b in self.blocks]
        self.reset()
        return torch.cat(parts, dim=1)  # (B, D)

    def project(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Projected per-sample gradients of one batch: forward + backward, no ordinary weight ``.grad``.

        Args:
            batch: model inputs with ``labels`` (-100 = ignored; padding needs an ``attention_mask``).

        Returns:
            (B, D) float32 rows (float64 for a float64 model) in metadata slice order. Dropout is off
            during the pass (the model is put in eval mode and restored).
        """
        if self._engine is None:
            self._engine = self.make_engine(weight_grads=False)
        was_training = self.model.training
        self.model.eval()
        self.reset()
        try:
            shift = self._shifts_labels()
            with torch.enable_grad(), self._engine.capture(self.loss_scale(batch, shift=shift)):
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                loss = causal_lm_loss(self.model(**inputs).logits, batch["labels"], shift=shift)
                loss.backward()
            self.last_loss_tensor = loss.detach()  # read lazily: no GPU wait here
            rows = self.collect()
        finally:
            self.model.train(was_training)
        return rows if rows.dtype == torch.float64 else rows.float()

    def loss_scale(self, batch: Mapping[str, Any], *, shift: bool | None = None) -> LossScale:
        """Rescaling for the batch's token-mean loss (``model(**batch).loss``) to per-sample mean losses.

        Whether the loss shifts labels is the package's one answer,
        :func:`hf_gradext.integrations.loss.shifts_labels` (``shift=None``: asked once per projector).
        """
        if shift is None:
            shift = self._shifts_labels()
        return LossScale.batch_mean(batch, shift=shift)

    def _shifts_labels(self) -> bool:
        # Asked once per projector: the model's loss function does not change between batches.
        if self._shift is None:
            self._shift = shifts_labels(self.model)
        return self._shift

    def close(self) -> None:
        """Remove the hooks of the engine :meth:`project` created."""
        if self._engine is not None:
            self._engine.remove()
            self._engine = None

    # ------------------------------------------------------------------ exact reference
    def naive_project(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Project materialized per-sample gradients ``{weight_name: (B, *shape)}`` with the same matrices.

        The independent check of the factored path (``per_sample_gradients`` output can be passed
        directly; sparse embedding gradients are densified).
        """
        parts = []
        for b in self.blocks:
            grad = grads[b.weight_name]
            grad = (
                grad.to_dense() if hasattr(grad, "to_dense") and not isinstance(grad, torch.Tensor) else grad
            )
            p_in, p_out = self._factors[b.name]
            parts.append(naive_project(grad, p_in, p_out, b.layout))
        return torch.cat(parts, dim=1)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, shift: bool = True) -> torch.Tensor:
    """HF's LM loss: token mean over ``labels != -100`` of the whole batch (shifted by one when ``shift``:
    logit ``t`` predicts ``labels[t + 1]``), computed in float64 for a float64 model (HF upcasts to float32
    only, which would cap the exactness tests)."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    target = labels.to(logits.device)  # (B, T')
    total = torch.nn.functional.cross_entropy(
        logits.to(dtype).reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return total / target.ne(-100).sum().clamp_min(1)


def resolve_proj_layers(args: Any, model: nn.Module) -> str:
    """``--proj_layers``; its default (``mlp,attn``) means the LoRA layers when the model is a peft model.

    Under peft only the adapters train, and LoRA usually targets a subset of the blocks (GPT-2: ``c_attn``),
    so the dense default would select layers without trainable weights. "peft model" means: carries peft
    LoRA layers (a ``PeftModel`` or adapters added to a transformers model), see
    :func:`hf_gradext.integrations.peft.has_lora_layers`.
    """
    from hf_gradext.arguments.projection import ProjectionArguments
    from hf_gradext.integrations.peft import has_lora_layers

    default = ProjectionArguments.__dataclass_fields__["proj_layers"].default
    if args.proj_layers == default and has_lora_layers(model):
        return "lora"
    return args.proj_layers


def projector_from_args(model: nn.Module, args: Any, layers: str | None = None) -> KroneckerProjector:
    """A :class:`KroneckerProjector` configured by the ``--proj_*`` / ``--include_embeddings`` flags.

    ``layers`` overrides ``--proj_layers`` (whose default means the LoRA layers of a peft model, see
    :func:`resolve_proj_layers`). ``--proj_precondition`` folds the checkpoint's Adam scale into the factors
    (:func:`hf_gradext.projection.preconditioning.fold_from_args`), recorded in the metadata.

    Raises:
        UserFacingError: naming ``--proj_layers`` when the selection fits no layer, the rank flag, or
        ``--proj_precondition`` when its optimizer state does not fit the model.
    """
    from hf_gradext.projection.preconditioning import fold_from_args

    chosen = resolve_proj_layers(args, model) if layers is None else layers
    try:
        projector = KroneckerProjector(
            model,
            layers=chosen,
            rank_total=args.proj_rank_total,
            rank_min=args.proj_rank_min,
            seed=args.proj_seed,
            method="row_orthonormal" if getattr(args, "proj_row_orthonormal", False) else args.proj_method,
            split=args.proj_split,
            include_embeddings=args.include_embeddings,
            dtype=args.proj_dtype,
        )
    except UserFacingError as exc:
        if str(exc).startswith("--proj_"):
            raise
        raise UserFacingError(f"--proj_layers={chosen}: {exc}; pick layers from that list") from None
    return fold_from_args(projector, args)
