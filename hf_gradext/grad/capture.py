"""The capture engine: forward hooks record each selected layer's input ``a`` and a tensor hook on its
output records ``g``, the gradient w.r.t. that output, during ONE armed forward + backward.

Why tensor hooks on the output (not ``register_full_backward_hook``): the pair ``(a, g)`` is bound in one
closure per forward call, so

* activation checkpointing cannot double-record: the recomputed forward of non-reentrant checkpointing is
  never backpropagated (its hooks never fire), and reentrant checkpointing's first forward runs without
  grad (nothing is registered);
* a module called several times in one forward (shared / tied modules) yields one pair per call; the pairs
  are concatenated along the token axis, which is exactly the sum of their gradient contributions.

Contract used by the collection and projection features::

    engine = CaptureEngine(model, layers="attn,mlp", on_capture=fn, keep=False)
    with engine.capture(batch_or_loss_scale):    # arms for one forward + backward
        model(**batch).loss.backward()
    # fn(name, module, a, g) was called inside the backward: a (B, T, d_in) layer input (embeddings: the
    # (B, T) ids), g (B, T, d_out) gradient of sum_i L_i (see loss_scaling), padding rows exactly 0.
    engine.remove()

Layer math called from ``fn`` goes through ``engine.math(name, a, g)`` (or ``engine.specs[name].math``,
bound to the same record): with ``weight_grads=False`` every parameter is frozen while armed, and the
engine answers "trainable?" from what ``requires_grad`` was just before it froze them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from hf_gradext.errors import UserFacingError
from hf_gradext.grad.factors import Contribution, as_token_ids, as_tokens
from hf_gradext.grad.fallback import FALLBACK_SPEC, check_fallback_ok
from hf_gradext.grad.loss_scaling import LossScale, resolve_scale
from hf_gradext.grad.registry import LayerSpec, lookup
from hf_gradext.grad.selection import clean_name, select_modules, unwrap_model

OnCapture = Callable[[str, nn.Module, Tensor, Tensor], None]


class CaptureEngine:
    """Hooks on the selected modules of ``model`` that capture ``(a, g)`` when armed.

    Args:
        model: the model (plain, DDP/FSDP-wrapped, peft, compiled); hooks go on its inner modules.
        layers: selection (see :func:`hf_gradext.grad.selection.select_modules`).
        on_capture: ``fn(name, module, a, g)`` called inside the backward for each module call.
        keep: also store the pairs in ``self.records`` for :meth:`contributions`.
        weight_grads: ``False`` -> while armed, every parameter is frozen so backward computes no ordinary
            ``.grad`` (a pure measurement pass); outputs of hooked modules and of embeddings are made
            to require grad so backward still reaches every hooked layer.
        unsupported: ``"error"`` (default) refuses trainable modules with no registered math;
            ``"torch.func"`` uses the vmap fallback for them.

    Attributes:
        modules: ``{name: module}`` selected at construction.
        specs: ``{name: LayerSpec}`` whose ``math(module, a, g)`` reports the parameters trainable by
            :meth:`is_trainable`, so it stays right inside an armed ``weight_grads=False`` backward.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str = "all",
        *,
        on_capture: OnCapture | None = None,
        keep: bool = True,
        weight_grads: bool = True,
        unsupported: str = "error",
    ) -> None:
        if unsupported not in ("error", "torch.func"):
            raise UserFacingError(f"unsupported={unsupported!r}: use 'error' or 'torch.func'")
        self.model = model
        self._frozen: set[int] = set()  # ids of the parameters this engine froze while armed
        self.modules: dict[str, nn.Module] = select_modules(model, layers)
        self.specs: dict[str, LayerSpec] = self._resolve_specs(unsupported)
        self.on_capture = on_capture
        self.keep = keep
        self.weight_grads = weight_grads
        self.records: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self._armed = False
        self._scale: LossScale | None = None
        self._batch_size: int | None = None
        self._handles: list[RemovableHandle] = []
        # id(parameter) -> (parameter, name); the parameter is held so its id cannot be reused
        self._param_names: dict[int, tuple[nn.Parameter, str]] = {}
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(partial(self._forward_hook, name)))
        if not weight_grads:
            # Embedding outputs start the graph when nothing else requires grad (reentrant checkpointing
            # needs a grad-requiring input to each checkpointed block).
            for module in unwrap_model(model).modules():
                if isinstance(module, nn.Embedding) and module not in self.modules.values():
                    self._handles.append(module.register_forward_hook(self._leaf_hook))

    # ------------------------------------------------------------------ setup
    def _resolve_specs(self, unsupported: str) -> dict[str, LayerSpec]:
        specs: dict[str, LayerSpec] = {}
        missing: list[str] = []
        for name, module in self.modules.items():
            spec = lookup(module)
            if spec is None:
                check_fallback_ok(name, module)
                if unsupported == "error":
                    missing.append(f"{name} ({type(module).__name__})")
                    continue
                spec = FALLBACK_SPEC
            specs[name] = spec.bind(self.is_trainable)
        if missing:
            shown = ", ".join(missing[:6]) + (f", ... ({len(missing)} in all)" if len(missing) > 6 else "")
            raise UserFacingError(
                f"no per-sample gradient math for trainable modules {shown}; exclude them with a layer "
                "selection, freeze them, or pass unsupported='torch.func' to use the vmap fallback"
            )
        return specs

    # ------------------------------------------------------------------ arming
    @contextmanager
    def capture(self, info: LossScale | Mapping[str, Any] | None = None) -> Iterator[CaptureEngine]:
        """Arm the hooks for one forward + backward.

        Args:
            info: a :class:`LossScale` (exact rescaling of the loss you backward), a batch dict (the loss
                is the model's default token mean over that batch), or ``None`` (no rescaling: ``g`` is the
                raw gradient of whatever is backwarded).
        """
        if self._armed:
            raise RuntimeError("CaptureEngine.capture() is not re-entrant")
        self._scale = resolve_scale(info, self.model)
        self._batch_size = self._scale.batch_size if self._scale is not None else None
        self.records = {}
        frozen: list[nn.Parameter] = []
        if not self.weight_grads:
            frozen = [p for p in self.model.parameters() if p.requires_grad]
            # Record before freezing: layer math asks is_trainable() during the backward.
            self._frozen = {id(p) for p in frozen}
            for p in frozen:
                p.requires_grad_(False)
        self._armed = True
        try:
            yield self
        finally:
            self._armed = False
            for p in frozen:
                p.requires_grad_(True)
            self._frozen = set()

    def is_trainable(self, param: nn.Parameter) -> bool:
        """Whether ``param`` is trained: its ``requires_grad`` as it was before this engine froze it."""
        return param.requires_grad or id(param) in self._frozen

    def math(self, name: str, a: Tensor, g: Tensor) -> dict[str, Contribution]:
        """The layer math of selected module ``name`` on one captured pair (callable from ``on_capture``).

        Returns:
            ``{local parameter name: Contribution}`` for the module's trainable parameters.
        """
        with self._paused():
            return self.specs[name].math(self.modules[name], a, g)

    @contextmanager
    def _paused(self) -> Iterator[None]:
        # The torch.func fallback re-runs the hooked module (forward + vjp): while armed, our own hooks
        # would capture that pass and call on_capture again, without end. Math is never captured.
        armed, self._armed = self._armed, False
        try:
            yield
        finally:
            self._armed = armed

    def remove(self) -> None:
        """Remove every hook; the engine captures nothing afterwards."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ hooks
    def _leaf_hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if (
            self._armed
            and isinstance(output, Tensor)
            and torch.is_grad_enabled()
            and not output.requires_grad
        ):
            return output.detach().requires_grad_()
        return None

    def _forward_hook(self, name: str, module: nn.Module, args: tuple, output: Any) -> Any:
        if not self._armed:
            return None
        if not isinstance(output, Tensor) or not args or not isinstance(args[0], Tensor):
            raise UserFacingError(
                f"capture: {name} ({type(module).__name__}) must take a tensor and return a tensor; "
                "exclude it from the layer selection"
            )
        spec = self.specs[name]
        a = args[0].detach()
        replaced = False
        if spec.autocast_input and a.is_floating_point() and torch.is_autocast_enabled(a.device.type):
            a = a.to(torch.get_autocast_dtype(a.device.type))  # what the layer multiplied with
        if not self.weight_grads and torch.is_grad_enabled() and not output.requires_grad:
            output, replaced = output.detach().requires_grad_(), True
        if spec.family == "embedding":
            batch = self._batch_size or 0
            if a.shape[0] == 1 and batch > 1:
                # Position embeddings looked up with (1, T) ids are broadcast over the batch, which would
                # sum samples in the gradient: expand to (B, T) so each sample gets its own rows.
                a = a.expand(batch, *a.shape[1:])
                output, replaced = output.expand(batch, *output.shape[1:]), True
            elif self._batch_size is None:
                self._batch_size = a.shape[0]
        if output.requires_grad:
            output.register_hook(partial(self._grad_hook, name, module, a))
        return output if replaced else None

    def _grad_hook(self, name: str, module: nn.Module, a: Tensor, grad: Tensor) -> None:
        family = self.specs[name].family
        g = grad.detach()
        if family in ("linear", "embedding"):
            # Flatten every non-batch, non-feature dim into one token axis: (B, T, d), sizes explicit so
            # an empty batch (B = 0) reshapes too.
            g = as_tokens(g)  # (B, T, d_out)
            a = as_token_ids(a) if family == "embedding" else as_tokens(a)  # (B, T) | (B, T, d_in)
        if self._scale is not None:
            seq = g.shape[1] if g.dim() >= 3 else 1
            scale = self._scale.row_scale(g.shape[0], seq, g.device, g.dtype)  # (B, T|1, 1)
            g = g * scale.reshape(scale.shape[0], *scale.shape[1:2], *([1] * (g.dim() - 2)))
        if self.on_capture is not None:
            with self._paused():
                self.on_capture(name, module, a, g)
        if self.keep:
            self.records.setdefault(name, []).append((a, g))

    # ------------------------------------------------------------------ results
    def pair(self, name: str) -> tuple[Tensor, Tensor]:
        """The captured ``(a, g)`` of one module, several calls concatenated along the token axis."""
        pairs = self.records[name]
        if len(pairs) == 1:
            return pairs[0]
        return torch.cat([p[0] for p in pairs], 1), torch.cat([p[1] for p in pairs], 1)

    def contributions(self, dtype: torch.dtype | None = None) -> dict[str, list[Contribution]]:
        """Per-parameter contributions ``{parameter name: [Contribution, ...]}`` from the kept records.

        Callable inside or after the ``with capture(...)`` block. ``dtype=None`` computes in the captured
        dtype promoted to at least float32.

        Names are the unwrapped model's ``named_parameters()`` names; a parameter shared by several
        modules (tied ``wte`` / ``lm_head``) appears once, under its first name, with one contribution
        per module.
        """
        out: dict[str, list[Contribution]] = {}
        for name in self.records:
            module = self.modules[name]
            a, g = self.pair(name)
            dt = dtype or torch.promote_types(g.dtype, torch.float32)  # bf16 captures: math in fp32
            a = a.to(dt) if a.is_floating_point() else a
            g = g.to(dt)
            for local, contrib in self.math(name, a, g).items():
                out.setdefault(self._param_name(getattr(module, local)), []).append(contrib)
        return out

    def _param_name(self, param: nn.Parameter) -> str:
        """The model's ``named_parameters()`` name of ``param`` (cached; rebuilt when a parameter is new)."""
        entry = self._param_names.get(id(param))
        if entry is None or entry[0] is not param:
            # named_parameters() yields a tied parameter once, under its first name
            self._param_names = {
                id(p): (p, clean_name(n)) for n, p in unwrap_model(self.model).named_parameters()
            }
            entry = self._param_names[id(param)]
        return entry[1]
