"""One-call collection outside a Trainer: per-sample gradients of a batch, streamed to shards."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from hf_gradext.collection.chunking import MIB
from hf_gradext.collection.collector import StepCollector
from hf_gradext.collection.consumer import CaptureConsumer, example_ids_of
from hf_gradext.collection.memory import PeakMemoryMeter
from hf_gradext.collection.separate import run_separate
from hf_gradext.collection.sink import GradientSink, collection_output
from hf_gradext.grad.capture import CaptureEngine
from hf_gradext.grad.selection import select_modules
from hf_gradext.store.policy import (
    RunFingerprint,
    choose_mode,
    model_fingerprint,
    prepare_output_dir,
    refuse_fresh_into_rows,
)

WRITER = "batch_collector"  # the writer named in the directory's run fingerprint


class BatchCollector:
    """Collects per-sample gradients of whole batches with an own fp32 eval-mode pass.

    Args:
        model: the model (its ``param.grad`` is never touched).
        directory: shard directory (``None`` with ``save="stats"``).
        layers: layer selection (all|attn|mlp|embed|norm, comma lists, regexes).
        save: ``full``, ``norms`` or ``stats``.
        method: ``engine`` (one backward) or ``loop`` (one backward per sample, reference only).
        dtype: storage dtype of full gradients.
        memory_budget_mb: extra memory allowed for materialized gradients.
        chunk_size: samples materialized at once (0 = from the budget).
        rank: written into index rows and shard names.
        overwrite: remove the shards an earlier run left in ``directory`` (logged) and start over.
        resume: add to the shards an earlier collector of the same model weights and settings wrote.
            Without either, a directory holding shards is refused (see :mod:`hf_gradext.store.policy`).
    """

    def __init__(
        self,
        model: nn.Module,
        directory: str | os.PathLike | None = None,
        layers: str = "all",
        save: str = "full",
        method: str = "engine",
        dtype: str = "float32",
        memory_budget_mb: float = 1024.0,
        chunk_size: int = 0,
        rank: int = 0,
        overwrite: bool = False,
        resume: bool = False,
    ) -> None:
        self.model = model
        writes = save != "stats" and directory is not None
        if writes:  # a directory holding another run's shards fails before any hook is installed
            out = collection_output(directory, "directory", "overwrite=True", "resume=True")
            mode = choose_mode(overwrite, resume, "overwrite=True", "resume=True")
            refuse_fresh_into_rows(out, mode)
        if method == "engine":
            self.engine: CaptureEngine | None = CaptureEngine(model, layers, keep=False, weight_grads=False)
            modules, specs = self.engine.modules, self.engine.specs
        else:
            self.engine = None
            modules, specs = select_modules(model, layers), {}
        if writes:
            settings = {"layers": sorted(modules), "save": save, "dtype": dtype}
            prepare_output_dir(
                out, mode, RunFingerprint(WRITER, settings, model_fingerprint(model)), rank=rank
            )
        self.sink = GradientSink(directory, rank) if writes else None
        device = next(model.parameters()).device
        self.collector = StepCollector(
            save,
            self.sink,
            {},
            {},
            dtype,
            int(memory_budget_mb * MIB),
            chunk_size,
            rank,
            PeakMemoryMeter(device),
        )
        self.consumer = CaptureConsumer(model, modules, specs, self.collector)
        self.collector.groups, self.collector.param_shapes = self.consumer.groups, self.consumer.param_shapes
        if self.engine is not None:
            self.engine.on_capture = self.consumer.on_capture

    def collect(
        self, batch: dict[str, Any], step: int = 0, max_samples: int | None = None
    ) -> dict[str, float]:
        """Collect the first ``max_samples`` samples of ``batch`` as step ``step``; returns the statistics."""
        n = (
            int(batch["input_ids"].shape[0])
            if max_samples is None
            else min(max_samples, len(batch["input_ids"]))
        )
        self.collector.begin_step(step)
        ids = example_ids_of(batch, n, list(range(n)))
        run_separate(self.model, batch, n, self.consumer, self.engine, ids)
        return self.collector.end_step()

    def close(self) -> None:
        """Wait for every shard to be on disk and remove the hooks."""
        if self.sink is not None:
            self.sink.close()
        if self.engine is not None:
            self.engine.remove()

    def __enter__(self) -> BatchCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
