"""Optimizer-aware (Adam-preconditioned) per-sample gradients, as LESS uses for data selection.

An Adam step on example ``i`` moves the weights by ``-lr * s * g_i`` with the elementwise scale
``s = (sqrt(v_hat) + eps) ** -1`` (``v_hat`` = bias-corrected ``exp_avg_sq`` of the trained optimizer), so
the first-order change of a query's loss is ``-lr * g_q . (s * g_i)``. The preconditioned gradient of a
training example is therefore ``s ** power * g_i`` (``power=1``: the training side only, the query side
plain; ``power=0.5`` on both sides gives the same dot product and a symmetric metric for cosine).

Where the scale is applied (the projection never builds ``g_i``):

* ``exact``: ``s * G_i`` elementwise on materialized per-sample gradients
  (:func:`hf_gradext.grad.per_sample_gradients`), then :meth:`KroneckerProjector.naive_project`. Exact, but
  it costs the full ``(B, d_out, d_in)`` gradients: small models / few examples only.
* ``adafactor`` / ``rank1``: a rank-1 approximation ``S ~ r c^T`` of the scale (``r`` over ``d_out``, ``c``
  over ``d_in``). Then ``P_o (S * G) P_i^T ~ (P_o diag(r)) G (P_i diag(c))^T``: the scale folds into the
  projection factors, and the factored path (``project``, the dataset pass, train-time projection) runs
  unchanged at its usual cost (:meth:`AdamPreconditioner.fold_into`). ``adafactor`` factors ``v_hat + eps^2``
  as Adafactor does (row means times column means over the grand mean), then takes ``(.) ** (-power/2)``;
  ``rank1`` is the top singular pair of ``S ** power`` itself (Frobenius-optimal; ``S > 0`` so both
  vectors are positive). Their error against the elementwise scale is
  :meth:`AdamPreconditioner.factor_error` (measured numbers: docs/projection.md).

Only 2-D weights are scaled (biases and norm layers are not projected). The optimizer state is matched
to parameter names the way HF's ``Trainer.create_optimizer`` builds its two groups (weight decay, then
no decay, each in ``named_parameters`` order); the match is checked against every state tensor's shape.

Flags (docs/preconditioning.md): ``--proj_precondition`` / ``--proj_precondition_mode`` /
``--proj_precondition_power`` build the preconditioner (:func:`preconditioner_from_args`) and fold it into the
projector that ``projector_from_args`` returns (:func:`fold_from_args`); ``full-grads`` applies it exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_gradext.errors import UserFacingError

MODES = ("exact", "adafactor", "rank1")


def _decay_names(model: nn.Module) -> set[str]:
    """Names HF's Trainer puts in the weight-decay group (its own rule, whichever transformers is installed)."""
    from transformers import Trainer

    return set(Trainer.get_decay_parameter_names(None, model))  # uses no instance state


def _candidate_orders(model: nn.Module) -> list[tuple[str, list[list[str]]]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = _decay_names(model)
    hf = [[n for n, _ in named if n in decay], [n for n, _ in named if n not in decay]]
    return [("hf_trainer_groups", hf), ("named_parameters", [[n for n, _ in named]])]


def _match_state(state: Mapping[str, Any], model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{parameter name: per-parameter state + its group}`` from an optimizer ``state_dict`` (shape-checked)."""
    groups = state["param_groups"]
    ids = [i for g in groups for i in g["params"]]
    group_of = {i: g for g in groups for i in g["params"]}
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    tried = []
    for label, order in _candidate_orders(model):
        flat = [n for g in order for n in g]
        if len(flat) != len(ids) or (
            label == "hf_trainer_groups" and [len(g["params"]) for g in groups] != [len(g) for g in order]
        ):
            tried.append(
                f"{label}: {[len(g) for g in order]} parameters vs {[len(g['params']) for g in groups]}"
            )
            continue
        out, bad = {}, None
        for i, name in zip(ids, flat):
            entry = state["state"].get(i)
            if entry is None or "exp_avg_sq" not in entry:
                continue  # a parameter never stepped (no gradient): no scale, left unscaled
            if tuple(entry["exp_avg_sq"].shape) != shapes[name]:
                bad = f"{label}: {name} {shapes[name]} vs state {tuple(entry['exp_avg_sq'].shape)}"
                break
            out[name] = {**entry, "group": group_of[i]}
        if bad is None:
            return out
        tried.append(bad)
    raise UserFacingError(
        "the optimizer state does not match this model's parameters (" + "; ".join(tried) + "); load the "
        "model the checkpoint was trained with, with the same trainable parameters"
    )


@dataclass
class AdamPreconditioner:
    """Adam's elementwise scale ``s ** power = (sqrt(v_hat) + eps) ** -power`` for each 2-D weight.

    ``second_moments`` is ``{parameter name: v_hat (stored shape)}``, float64 on the CPU. Build it with
    :meth:`from_checkpoint` (an HF checkpoint directory or its ``optimizer.pt``), :meth:`from_optimizer`
    (a live ``torch.optim.Adam`` / ``AdamW``) or :meth:`from_state_dict`.
    """

    second_moments: dict[str, torch.Tensor]
    eps: float = 1e-8
    power: float = 1.0
    source: str = ""
    step: int | None = None  # the optimizer step of the state (recorded, not used in the math)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, Any],
        model: nn.Module,
        *,
        power: float = 1.0,
        eps: float | None = None,
        source: str = "",
    ) -> AdamPreconditioner:
        """From an optimizer ``state_dict`` (Adam / AdamW: ``exp_avg_sq``, ``step``, ``betas``, ``eps``).

        Args:
            state: ``optimizer.state_dict()`` (what ``Trainer`` saves as ``optimizer.pt``).
            model: the model the optimizer trained (names are its ``named_parameters``).
            power: the exponent of ``s``: 1 (LESS: training rows only), 0.5 (both sides, symmetric).
            eps: override the optimizer's eps (default: its own).
        """
        moments, group_eps = {}, []
        for name, entry in _match_state(state, model).items():
            if entry["exp_avg_sq"].dim() == 2:  # only 2-D weights are projected
                group = entry["group"]
                moments[name] = _v_hat(entry, float(group.get("betas", (0.9, 0.999))[1]))
                group_eps.append(float(group.get("eps", 1e-8)))
        built = cls._build(moments, group_eps, eps, power, source)
        steps = [e.get("step") for e in state["state"].values() if "step" in e]
        if steps:
            step = steps[0]
            built.step = int(step.item() if isinstance(step, torch.Tensor) else step)
        return built

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, model: nn.Module, *, power: float = 1.0, eps: float | None = None
    ) -> AdamPreconditioner:
        """From ``checkpoint-N/`` (its ``optimizer.pt``, as ``Trainer`` saves it) or the file itself."""
        path = Path(path)
        file = path / "optimizer.pt" if path.is_dir() else path
        if not file.is_file():
            raise UserFacingError(
                f"{file} not found: pass a Trainer checkpoint directory (checkpoint-N) saved with its optimizer "
                "(not save_only_model), or the optimizer.pt file"
            )
        state = torch.load(file, map_location="cpu", weights_only=True)
        return cls.from_state_dict(state, model, power=power, eps=eps, source=str(file))

    @classmethod
    def from_optimizer(
        cls,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        *,
        power: float = 1.0,
        eps: float | None = None,
    ) -> AdamPreconditioner:
        """From a live optimizer, matched to names by parameter identity (any group layout)."""
        names = {id(p): n for n, p in model.named_parameters()}
        moments, group_eps = {}, []
        for group in optimizer.param_groups:
            for p in group["params"]:
                entry = optimizer.state.get(p, {})
                if p.dim() == 2 and "exp_avg_sq" in entry and id(p) in names:
                    moments[names[id(p)]] = _v_hat(entry, float(group.get("betas", (0.9, 0.999))[1]))
                    group_eps.append(float(group.get("eps", 1e-8)))
        return cls._build(moments, group_eps, eps, power, "optimizer")

    @classmethod
    def _build(cls, moments, group_eps, eps, power, source) -> AdamPreconditioner:
        if not moments:
            raise UserFacingError(
                "the optimizer state holds no exp_avg_sq for a 2-D weight: was it Adam(W), stepped?"
            )
        if eps is None and len(set(group_eps)) > 1:
            raise UserFacingError(
                f"the optimizer's groups use different eps {sorted(set(group_eps))}: pass eps"
            )
        return cls(moments, float(group_eps[0] if eps is None else eps), float(power), source)

    # ------------------------------------------------------------------ exact (elementwise)
    def scale(self, name: str) -> torch.Tensor:
        """The exact elementwise scale ``(sqrt(v_hat) + eps) ** -power`` of weight ``name`` (stored shape)."""
        return (self.second_moments[name].sqrt() + self.eps).pow(-self.power)

    def apply(self, grads: Mapping[str, Any]) -> dict[str, Any]:
        """``{name: s ** power * G}`` for materialized per-sample gradients ``{name: (B, *shape)}``.

        Parameters without a second moment (never stepped, or 1-D) are returned unchanged; sparse embedding
        gradients are densified.
        """
        out: dict[str, Any] = {}
        for name, grad in grads.items():
            if name not in self.second_moments:
                out[name] = grad
                continue
            dense = grad if isinstance(grad, torch.Tensor) else grad.to_dense()
            out[name] = dense * self.scale(name).to(dense.device, dense.dtype)  # (B, *shape) * (*shape)
        return out

    # ------------------------------------------------------------------ factored (Kronecker-compatible)
    def factored(self, name: str, mode: str = "rank1") -> tuple[torch.Tensor, torch.Tensor]:
        """``(u, w)`` with ``scale ~ outer(u, w)`` in the weight's *stored* layout (``u`` over dim 0)."""
        if mode == "rank1":
            # Top singular pair of a positive matrix: one sign each (Perron-Frobenius), taken positive.
            u, sig, vh = torch.linalg.svd(self.scale(name), full_matrices=False)
            return u[:, 0].abs() * sig[0].sqrt(), vh[0].abs() * sig[0].sqrt()
        if mode == "adafactor":
            # v ~ outer(R, C) / mean(R), R and C the row and column means (Adafactor; the same as
            # outer(r, c) / sum(r) with sums r, c); eps^2 is added to
            # v so that the scale stays separable: (v + eps^2) ** (-power / 2) instead of (sqrt(v) + eps) ** -power.
            v = self.second_moments[name] + self.eps**2  # (m, n)
            row, col = v.mean(dim=1), v.mean(dim=0)
            return row.pow(-self.power / 2), (col / row.mean()).pow(-self.power / 2)
        raise ValueError(f"mode must be one of {MODES[1:]} (factored), got {mode!r}")

    def factor_error(self, mode: str = "rank1") -> dict[str, float]:
        """Relative Frobenius error ``|S - outer(u, w)| / |S|`` of the factored scale, per weight."""
        out = {}
        for name in self.second_moments:
            s = self.scale(name)
            u, w = self.factored(name, mode)
            out[name] = float((s - torch.outer(u, w)).norm() / s.norm())
        return out

    def fingerprint(self) -> str:
        """``sha256:`` of every second moment (name, shape, float64 bytes) and eps: what makes the rows."""
        digest = hashlib.sha256(json.dumps({"eps": self.eps}).encode())
        for name in sorted(self.second_moments):
            v = self.second_moments[name].contiguous()  # (m, n) float64
            digest.update(f"{name}:{list(v.shape)}".encode())
            digest.update(v.numpy().tobytes())
        return "sha256:" + digest.hexdigest()

    def describe(self, mode: str) -> dict[str, Any]:
        """The JSON record of this preconditioning (``metadata.json``'s ``preconditioning``)."""
        return {
            "source": self.source,
            "mode": mode,
            "power": self.power,
            "eps": self.eps,
            "step": self.step,
            "weights": sorted(self.second_moments),
            "state_sha256": self.fingerprint(),
        }

    def fold_into(self, projector: Any, mode: str = "rank1") -> Any:
        """A new ``KroneckerProjector`` whose factors carry the factored scale: ``P_i diag(c)``, ``P_o diag(r)``.

        Its rows are ``vec((P_o diag(r)) G (P_i diag(c))^T) = vec(P_o (outer(r, c) * G) P_i^T)``: the
        projection of the factored-preconditioned gradient, from the usual factored path at its usual cost.
        Its metadata is the original projector's (the same ``P``) plus ``preconditioning``
        (:meth:`describe`: mode, power, eps, step, ``state_sha256``), which ``--resume`` and ``attribute``
        compare; :meth:`KroneckerProjector.from_metadata` rebuilds the plain ``P`` only.
        """
        from hf_gradext.projection.projector import KroneckerProjector

        new = KroneckerProjector.from_metadata(projector.metadata(), projector.model)
        for block in new.blocks:
            if block.weight_name not in self.second_moments:
                continue
            u, w = self.factored(block.weight_name, mode)
            r, c = (u, w) if block.layout == "out_in" else (w, u)  # r over d_out, c over d_in
            p_in, p_out = new.factors(block.name)
            # In place: factors() returns the new projector's own float64 tensors (device copies come later).
            p_in.mul_(c.to(p_in.dtype)[None, :])  # (k_i, d_in)
            p_out.mul_(r.to(p_out.dtype)[None, :])  # (k_o, d_out)
        new.preconditioning = self.describe(mode)
        return new


def preconditioner_from_args(model: nn.Module, args: Any) -> AdamPreconditioner | None:
    """The ``--proj_precondition*`` flags' preconditioner (``None`` when the flag is unset)."""
    path = getattr(args, "proj_precondition", None)
    if path is None:
        return None
    from hf_gradext.arguments.projection import optimizer_state_file

    power = float(getattr(args, "proj_precondition_power", 1.0))
    try:
        return AdamPreconditioner.from_checkpoint(optimizer_state_file(path), model, power=power)
    except UserFacingError as exc:
        if str(exc).startswith("--proj_precondition"):
            raise
        raise UserFacingError(f"--proj_precondition {path}: {exc}") from None


def fold_from_args(projector: Any, args: Any) -> Any:
    """``projector`` with the flags' preconditioning folded in and recorded (unchanged when unset)."""
    pre = preconditioner_from_args(projector.model, args)
    if pre is None:
        return projector
    return pre.fold_into(projector, getattr(args, "proj_precondition_mode", "rank1"))


def _v_hat(entry: Mapping[str, Any], beta2: float) -> torch.Tensor:
    """Bias-corrected second moment ``exp_avg_sq / (1 - beta2 ** step)`` (float64, CPU)."""
    step = entry.get("step", 0)
    step = float(step.item() if isinstance(step, torch.Tensor) else step)
    correction = 1.0 - beta2**step if step > 0 else 1.0
    return entry["exp_avg_sq"].detach().to("cpu", torch.float64) / correction
