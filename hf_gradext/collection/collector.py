"""Turns captured per-sample gradient contributions into norms, statistics and streamed shards.

The collector never runs a forward or backward itself: whoever owns the pass (the training-backward
observer, the separate-pass runner, or the loop baseline) hands it, per layer, the per-parameter
contributions (:mod:`hf_gradext.grad.factors`) of the samples being collected. Per layer it computes the
per-sample norms (ghost norms, no gradient built) and, in ``full`` mode, materializes the gradients in
sample chunks sized to the memory budget and streams each chunk to the :class:`GradientSink`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hf_gradext.collection.chunking import MIB, chunk_size_for, chunks
from hf_gradext.collection.memory import PeakMemoryMeter
from hf_gradext.collection.sink import GradientSink
from hf_gradext.collection.stats import collection_stats
from hf_gradext.grad.factors import Contribution, Dense, Outer, materialize_sum, sq_norms
from hf_gradext.grad.sparse import SparseRowGrad

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def slice_contribution(c: Contribution, sl: slice) -> Contribution:
    """The contribution restricted to samples ``sl`` (batch is the leading dim of every factor)."""
    if isinstance(c, Dense):
        return Dense(c.value[sl])
    return Outer(u=c.u[sl], v=None if c.v is None else c.v[sl], m=c.m)


def _dense_numel(cs: list[Contribution], shape: torch.Size) -> int:
    """Elements of one sample's materialized gradient (0 for a sparse embedding table)."""
    if all(isinstance(c, Outer) and c.is_index for c in cs):
        return 0
    return int(torch.Size(shape).numel())


class StepCollector:
    """Accumulates one optimizer step's collected samples, layer by layer.

    Args:
        save: ``"full"``, ``"norms"`` or ``"stats"``.
        sink: where shards go (``None`` for ``stats``).
        groups: layer name -> group (attn/mlp/embed/norm/other) for the logged statistics.
        param_shapes: parameter name -> shape (for the memory plan).
        dtype: storage dtype of full gradients.
        budget_bytes: extra memory allowed for materialized gradients.
        chunk_size: requested samples per chunk (0 = from the budget).
        rank: process rank written into index rows.
        meter: peak-memory meter.
    """

    def __init__(
        self,
        save: str,
        sink: GradientSink | None,
        groups: dict[str, str],
        param_shapes: dict[str, torch.Size],
        dtype: str = "float32",
        budget_bytes: int = 1024 * MIB,
        chunk_size: int = 0,
        rank: int = 0,
        meter: PeakMemoryMeter | None = None,
    ) -> None:
        self.save, self.sink, self.groups, self.rank = save, sink, groups, rank
        self.param_shapes = param_shapes
        self.dtype = DTYPES[dtype]
        self.budget_bytes, self.chunk_size = int(budget_bytes), chunk_size
        self.meter = meter or PeakMemoryMeter()
        self.step: int | None = None
        self.example_ids: list[Any] = []
        self.sq_norms: dict[str, list[Tensor]] = {}

    # ------------------------------------------------------------------ step lifecycle
    def begin_step(self, step: int) -> None:
        self.step, self.example_ids, self.sq_norms = step, [], {}
        self.meter.reset()

    def add_samples(self, example_ids: list[Any]) -> int:
        """Register the samples of one microbatch; returns the step-local index of the first one."""
        start = len(self.example_ids)
        self.example_ids.extend(example_ids)
        return start

    @property
    def num_samples(self) -> int:
        return len(self.example_ids)

    def add_layer(self, layer: str, contribs: dict[str, list[Contribution]], start: int) -> Tensor:
        """Collect one layer for samples ``start .. start + n - 1`` (``n`` = the contributions' batch).

        Args:
            layer: module name (index rows and statistics use it).
            contribs: parameter name -> contributions, already restricted to the collected samples.
            start: step-local index of the first sample (from :meth:`add_samples`).

        Returns:
            ``(n,)`` per-sample squared norm of the layer's gradient.
        """
        assert self.step is not None, "begin_step() first"
        first = next(iter(contribs.values()))[0]
        n = first.batch_size
        sq = None
        self.meter.start()
        for cs in contribs.values():
            term = sq_norms(cs).float()  # (n,)
            sq = term if sq is None else sq + term
        assert sq is not None
        self.meter.observe(sq)
        self.sq_norms.setdefault(layer, []).append(sq.detach())
        if self.save == "full":
            self._write_full(layer, contribs, start, n, sq)
        elif self.save == "norms" and self.sink is not None:
            self.sink.add(
                self.step,
                layer,
                {f"norm::{layer}": sq.clamp_min(0).sqrt()},
                self._rows(layer, start, n),
                group=self.groups.get(layer),
            )
        return sq

    def _rows(self, layer: str, start: int, n: int) -> list[dict[str, Any]]:
        return [
            {
                "step": self.step,
                "example_id": self.example_ids[start + j],
                "rank": self.rank,
                "layer": layer,
                "sample": start + j,
                "offset": j,
            }
            for j in range(n)
        ]

    def _write_full(
        self, layer: str, contribs: dict[str, list[Contribution]], start: int, n: int, sq: Tensor
    ) -> None:
        assert self.sink is not None
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        # fp32 materialization + (when casting) the stored copy live together for a moment.
        per_elem = 4 + (itemsize if self.dtype != torch.float32 else 0)
        numel = sum(_dense_numel(cs, self.param_shapes[p]) for p, cs in contribs.items())
        size = chunk_size_for(numel * per_elem, self.budget_bytes, self.chunk_size)
        for sl in chunks(n, size):
            self.meter.start()
            tensors: dict[str, Tensor] = {f"norm::{layer}": sq[sl].clamp_min(0).sqrt()}
            for pname, cs in contribs.items():
                grad = materialize_sum([slice_contribution(c, sl) for c in cs])
                if isinstance(grad, SparseRowGrad):
                    tensors[f"{pname}::sample"] = grad.sample_idx
                    tensors[f"{pname}::row"] = grad.row_idx
                    tensors[f"{pname}::values"] = grad.values.to(self.dtype)
                    tensors[f"{pname}::num_rows"] = torch.tensor(grad.num_rows)
                else:
                    tensors[pname] = grad.to(self.dtype)  # (c, *param.shape)
                self.meter.observe(*tensors.values())
            c = sl.stop - sl.start
            rows = self._rows(layer, start + sl.start, c)
            self.sink.add(
                self.step, layer, tensors, rows, params=list(contribs), group=self.groups.get(layer)
            )
            del tensors

    def end_step(self, prefix: str = "grad_collection") -> dict[str, float]:
        """Finish the step: hand pending shards to the writer and return the metrics to log."""
        # One device->host copy, then the statistics on CPU (no per-statistic GPU sync).
        sq = {layer: torch.cat(parts).cpu() for layer, parts in self.sq_norms.items()}
        metrics = collection_stats(sq, self.groups, prefix) if sq else {}
        metrics[f"{prefix}/samples"] = float(self.num_samples)
        metrics[f"{prefix}/peak_memory_mb"] = self.meter.peak_mb
        if self.sink is not None:
            self.sink.end_step()
        self.step = None
        return metrics
