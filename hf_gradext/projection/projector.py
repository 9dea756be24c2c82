"""``KroneckerProjector``: per-sample projected gradients of selected layers, from one backward.

Each selected ``nn.Linear`` / HF ``Conv1D`` weight (and, with ``include_embeddings``, each ``nn.Embedding``
table, including a tied ``lm_head``'s contribution) owns a slice ``[slice_start, slice_end)`` of the
output row, holding ``vec(P_o G_i P_i^T)`` (see :mod:`hf_gradext.projection.kronecker`). Biases and
norm layers are not projected. The capture engine (:mod:`hf_gradext.grad.capture`) supplies the layer
inputs ``a`` and output gradients ``g`` already rescaled to the gradient of each sample's own mean token
loss, with padding rows exactly zero.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_gradext.errors import UserFacingError
from hf_gradext.grad.capture import CaptureEngine
from hf_gradext.grad.loss_scaling import LossScale
from hf_gradext.grad.registry import lookup
from hf_gradext.grad.selection import clean_name, select_modules, unwrap_model
from hf_gradext.projection.kronecker import (
    naive_project,
    project_dense,
    project_embedding,
    project_tied_head,
)
from hf_gradext.projection.matrices import layer_seed, make_factors
from hf_gradext.projection.ranks import split_rank

logger = logging.getLogger(__name__)
FORMAT = "hf_gradext.projection/1"


@dataclass
class LayerBlock:
    """One projected weight and its slice of the output row (what ``metadata.json`` stores per layer)."""

    name: str  # module name in the unwrapped model
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


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("hf_gradext")
    except Exception:  # pragma: no cover - not installed
        return "unknown"


def _kind(module: nn.Module) -> str | None:
    spec = lookup(module)
    if spec is None:
        return None
    if spec.family == "embedding":
        return "embedding"
    if spec.family == "linear":
        return "linear" if isinstance(module, nn.Linear) else "conv1d"
    return None


class KroneckerProjector:
    """Kronecker (LoRA-style) projection of per-sample gradients.

    Args:
        model: the model (plain, DDP-wrapped or peft); names are those of the unwrapped model.
        layers: selection as in :func:`hf_gradext.grad.selection.select_modules` (``"mlp,attn"``, a
            regex like ``"transformer.h.0"``...); only Linear/Conv1D weights (and embeddings) are projected.
        rank_total: target ``k_i * k_o`` per layer. rank_min: lower bound of each factor.
        seed: projection seed. row_orthonormal: row-orthonormal factors instead of Gaussian ones.
        include_embeddings: also project ``nn.Embedding`` tables (and a tied ``lm_head``).
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
        _blocks: list[LayerBlock] | None = None,
    ) -> None:
        self.model = model
        self.layers, self.rank_total, self.rank_min = layers, rank_total, rank_min
        self.seed, self.row_orthonormal = seed, row_orthonormal
        self.include_embeddings, self.dtype = include_embeddings, dtype
        self.method = "row_orthonormal" if row_orthonormal else "gaussian"
        self.blocks = _blocks if _blocks is not None else self._build_blocks()
        self._route: dict[str, tuple[LayerBlock, str]] = {}
        for block in self.blocks:
            self._route[block.name] = (block, block.type)
            for head in block.tied_modules:
                self._route[head] = (block, "tied_head")
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

    # ------------------------------------------------------------------ layout
    def _build_blocks(self) -> list[LayerBlock]:
        root = unwrap_model(self.model)
        selected = select_modules(self.model, self.layers)
        if self.include_embeddings:
            selected.update(select_modules(self.model, "embed"))
        modules = {clean_name(n): m for n, m in root.named_modules()}
        order = {n: i for i, n in enumerate(modules)}
        embed_weights = {
            id(m.weight): n for n, m in modules.items() if _kind(m) == "embedding" and n in selected
        }
        blocks: list[LayerBlock] = []
        tied: dict[str, list[str]] = {}
        skipped = []
        for name in sorted(selected, key=order.__getitem__):
            module = selected[name]
            kind = _kind(module)
            weight = getattr(module, "weight", None)
            if kind is None or weight is None or not weight.requires_grad:
                skipped.append(name)
                continue
            if kind == "linear" and id(weight) in embed_weights:
                tied.setdefault(embed_weights[id(weight)], []).append(name)
                continue
            if kind != "embedding" and _shares_embedding_weight(root, weight):
                # A tied head alone would project only part of its parameter's gradient.
                skipped.append(f"{name} (tied to an embedding: pass include_embeddings)")
                continue
            blocks.append(self._block(name, kind, module))
        if skipped:
            logger.info("not projected (no Kronecker form or tied): %s", ", ".join(skipped))
        if not blocks:
            raise UserFacingError(
                f"--proj_layers={self.layers!r} selects no Linear/Conv1D weight (only {', '.join(skipped)}); "
                "select attention/MLP layers or pass --include_embeddings"
            )
        for block in blocks:
            block.tied_modules = tied.get(block.name, [])
        start = 0
        for block in blocks:
            block.slice_start, start = start, start + block.k_i * block.k_o
            block.slice_end = start
        return blocks

    def _block(self, name: str, kind: str, module: nn.Module) -> LayerBlock:
        shape = list(module.weight.shape)
        if kind == "linear":
            d_out, d_in, layout = shape[0], shape[1], "out_in"
        else:  # Conv1D weight (in, out); Embedding (V, d) treated as in=V, out=d
            d_in, d_out, layout = shape[0], shape[1], "in_out"
        k_i, k_o = split_rank(d_in, d_out, self.rank_total, self.rank_min)
        names = {id(p): clean_name(n) for n, p in unwrap_model(self.model).named_parameters()}
        return LayerBlock(
            name,
            kind,
            names[id(module.weight)],
            shape,
            layout,
            d_in,
            d_out,
            k_i,
            k_o,
            0,
            0,
            layer_seed(self.seed, name),
        )

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
        """Everything needed to rebuild every matrix (written as ``metadata.json``)."""
        return {
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
        if meta.get("format") != FORMAT:
            raise UserFacingError(
                f"metadata format {meta.get('format')!r} is not {FORMAT!r}; re-run the projection"
            )
        blocks = [LayerBlock(**b) for b in meta["layers"]]
        modules = {clean_name(n): m for n, m in unwrap_model(model).named_modules()}
        for b in blocks:
            module = modules.get(b.name)
            if module is None or list(getattr(module, "weight", torch.empty(0)).shape) != b.original_shape:
                raise UserFacingError(
                    f"metadata layer {b.name} {b.original_shape} does not exist in this model with that shape; "
                    "load the model the projection was made with"
                )
        return cls(
            model,
            layers=meta["proj_layers"],
            rank_total=meta["proj_rank_total"],
            rank_min=meta["proj_rank_min"],
            seed=meta["proj_seed"],
            row_orthonormal=meta["proj_method"] == "row_orthonormal",
            include_embeddings=meta["include_embeddings"],
            dtype=meta.get("proj_dtype", "bfloat16"),
            _blocks=blocks,
        )

    # ------------------------------------------------------------------ capture path
    def capture_layers(self) -> str:
        """Selection string of exactly the modules to hook (projected layers + tied heads)."""
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
        """Engine callback: add this module call's projected contribution to its block."""
        block, role = self._route[name]
        p_in, p_out = self._on_device(
            block.name, g.device, torch.float64 if g.dtype == torch.float64 else torch.float32
        )
        if role == "embedding":
            part = project_embedding(a, g, p_in, p_out)
        elif role == "tied_head":
            part = project_tied_head(a, g, p_in, p_out)
        else:
            part = project_dense(a, g, p_in, p_out)
        prev = self._partial.get(block.name)
        self._partial[block.name] = part if prev is None else prev + part

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
            with torch.enable_grad(), self._engine.capture(self.loss_scale(batch)):
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                loss = causal_lm_loss(self.model(**inputs).logits, batch["labels"])
                loss.backward()
            self.last_loss_tensor = loss.detach()  # read lazily: no GPU wait here
            rows = self.collect()
        finally:
            self.model.train(was_training)
        return rows if rows.dtype == torch.float64 else rows.float()

    def loss_scale(self, batch: Mapping[str, Any]) -> LossScale:
        """Rescaling for ``model(**batch).loss`` (token mean over the batch) to per-sample mean losses.

        Causal LMs shift labels by one; decided here from the config because the engine's
        ``shifts_labels`` reads ``model.loss_type``, which transformers leaves ``None`` for e.g.
        ``GPT2LMHeadModel`` (it then still uses ``ForCausalLMLoss``).
        """
        config = getattr(unwrap_model(self.model), "config", None)
        shift = not bool(getattr(config, "is_encoder_decoder", False))
        return LossScale.batch_mean(batch, shift=shift)

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


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HF's causal-LM loss (shift by one, token mean over ``labels != -100`` of the whole batch), computed
    in float64 for a float64 model (HF upcasts to float32 only, which would cap the exactness tests)."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    shifted = logits[:, :-1].to(dtype)  # (B, T-1, V)
    target = labels[:, 1:].to(logits.device)  # (B, T-1)
    total = torch.nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return total / target.ne(-100).sum().clamp_min(1)


def _shares_embedding_weight(root: nn.Module, weight: torch.Tensor) -> bool:
    return any(isinstance(m, nn.Embedding) and m.weight is weight for m in root.modules())


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
    :func:`resolve_proj_layers`).

    Raises:
        UserFacingError: naming ``--proj_layers`` when the selection fits no layer, or the rank flag.
    """
    chosen = resolve_proj_layers(args, model) if layers is None else layers
    try:
        return KroneckerProjector(
            model,
            layers=chosen,
            rank_total=args.proj_rank_total,
            rank_min=args.proj_rank_min,
            seed=args.proj_seed,
            row_orthonormal=args.proj_row_orthonormal,
            include_embeddings=args.include_embeddings,
            dtype=args.proj_dtype,
        )
    except UserFacingError as exc:
        if str(exc).startswith("--proj_"):
            raise
        raise UserFacingError(f"--proj_layers={chosen}: {exc}; pick layers from that list") from None
