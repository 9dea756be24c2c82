"""Feeds the capture engine's per-module ``(a, g)`` pairs into a :class:`StepCollector`.

Modules are processed as soon as the backward reaches them (``on_capture``), so nothing but the
collected samples' slice of ``a`` / ``g`` is kept. A parameter shared by several selected modules
(GPT-2's tied ``wte`` / ``lm_head``) needs the sum of their contributions, so those modules are held
back until the microbatch's backward is done (:meth:`CaptureConsumer.finish_microbatch`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from hf_gradext.collection.collector import StepCollector
from hf_gradext.grad.factors import Contribution, Dense
from hf_gradext.grad.registry import LayerSpec
from hf_gradext.grad.selection import clean_name, module_groups, unwrap_model

GROUP_ORDER = ("attn", "mlp", "embed", "norm")


def stats_group(name: str, module: nn.Module) -> str:
    """The statistics group of a selected module (attn/mlp/embed/norm, else other)."""
    groups = module_groups(name, module)
    return next((g for g in GROUP_ORDER if g in groups), "other")


class CaptureConsumer:
    """Routes captured pairs of the selected modules to the collector.

    Args:
        model: the model the engine hooks (wrappers are looked through).
        modules: the engine's selected modules ``{name: module}``.
        specs: the engine's ``{name: LayerSpec}`` (per-layer math).
        collector: the step collector.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: dict[str, nn.Module],
        specs: dict[str, LayerSpec],
        collector: StepCollector,
    ) -> None:
        self.modules, self.specs, self.collector = modules, specs, collector
        canonical = {id(p): clean_name(n) for n, p in unwrap_model(model).named_parameters()}
        # module name -> {local param name: canonical param name}
        self.param_names: dict[str, dict[str, str]] = {
            name: {
                local: canonical[id(p)] for local, p in m.named_parameters(recurse=False) if p.requires_grad
            }
            for name, m in modules.items()
        }
        owners: dict[str, list[str]] = {}
        for name, names in self.param_names.items():
            for pname in names.values():
                owners.setdefault(pname, []).append(name)
        self.shared = {m for names in owners.values() if len(names) > 1 for m in names}
        # A parameter's layer is the module its canonical name belongs to (``transformer.wte`` for the
        # tied ``transformer.wte.weight``, even when ``lm_head`` also contributes).
        self.layer_of = {p: p.rsplit(".", 1)[0] if "." in p else p for p in owners}
        self.groups: dict[str, str] = {}
        for name, module in modules.items():
            for pname in self.param_names[name].values():
                layer = self.layer_of[pname]
                owner = modules.get(layer, module)
                self.groups.setdefault(layer, stats_group(layer, owner))
        self.param_shapes = {
            pname: p.shape
            for name, m in modules.items()
            for local, p in m.named_parameters(recurse=False)
            if (pname := self.param_names[name].get(local))
        }
        self._take = 0
        self._start = 0
        self._seen: set[str] = set()
        self._held: dict[str, list[Contribution]] = {}

    # ------------------------------------------------------------------ per microbatch
    def begin_microbatch(self, example_ids: list[Any]) -> None:
        """Collect the first ``len(example_ids)`` samples of the next captured microbatch."""
        self._take = len(example_ids)
        self._start = self.collector.add_samples(example_ids)
        self._seen, self._held = set(), {}

    def on_capture(self, name: str, module: nn.Module, a: Tensor, g: Tensor) -> None:
        """The engine's ``on_capture``: one module's ``a`` (B, T, d_in) and scaled ``g`` (B, T, d_out)."""
        if self._take <= 0:
            return
        if name in self._seen:
            raise RuntimeError(
                f"gradient collection: module {name} ran twice in one forward; collect it with "
                "--gradient_collection_method loop or exclude it via --gradient_collection_layers"
            )
        self._seen.add(name)
        a = a[: self._take]
        a = a.float() if a.is_floating_point() else a  # fp32 math for the few collected samples
        g = g[: self._take].float()
        contribs = self._contribs(name, module, a, g)
        if name in self.shared:
            for pname, c in contribs.items():
                self._held.setdefault(pname, []).extend(c)
            return
        for layer, by_param in self._by_layer(contribs).items():
            self.collector.add_layer(layer, by_param, self._start)

    def finish_microbatch(self) -> None:
        """Collect the held-back (shared-parameter) layers once the backward is complete."""
        if self._held:
            for layer, by_param in self._by_layer(self._held).items():
                self.collector.add_layer(layer, by_param, self._start)
        self._held, self._take = {}, 0

    def add_dense(self, grads: dict[str, Tensor]) -> None:
        """Collect already materialized ``{param: (n, *shape)}`` gradients (the loop baseline)."""
        contribs = {p: [Dense(g)] for p, g in grads.items()}
        for layer, by_param in self._by_layer(contribs).items():
            self.collector.add_layer(layer, by_param, self._start)
        self._take = 0

    # ------------------------------------------------------------------ helpers
    def _contribs(self, name: str, module: nn.Module, a: Tensor, g: Tensor) -> dict[str, list[Contribution]]:
        names = self.param_names[name]
        return {
            names[local]: [c] for local, c in self.specs[name].math(module, a, g).items() if local in names
        }

    def _by_layer(self, contribs: dict[str, list[Contribution]]) -> dict[str, dict[str, list[Contribution]]]:
        out: dict[str, dict[str, list[Contribution]]] = {}
        for pname, cs in contribs.items():
            out.setdefault(self.layer_of[pname], {})[pname] = cs
        return out


def example_ids_of(inputs: dict[str, Any], n: int, fallback: list[Any]) -> list[Any]:
    """The ``example_id`` column of a batch (first ``n``), else ``fallback``."""
    ids = inputs.get("example_id")
    if isinstance(ids, Tensor):
        return [int(x) for x in ids[:n].tolist()]
    if isinstance(ids, list):
        return list(ids[:n])
    return fallback
