"""Streaming of collected per-sample gradients into safetensors shards (via :class:`ShardWriter`).

Shard layout (prefix ``grads``, one rank per file name, every shard holds rows of ONE optimizer step):

* dense gradient of parameter ``P``: tensor ``P`` of shape ``(c, *P.shape)``;
* sparse embedding gradient of ``P``: ``P::sample`` (U,) local sample offset, ``P::row`` (U,) table row,
  ``P::values`` (U, dim), ``P::num_rows`` (scalar table size) -- only the rows a sample touched;
* per-sample norm of layer ``L`` (a module name): ``norm::L`` of shape ``(c,)`` (float32).

Index rows (one per sample and layer): ``{"step", "example_id", "rank", "layer", "sample", "offset"}``;
``offset`` is the sample's position along the leading dim of that layer's tensors in this shard and
``sample`` its position among the samples collected at that step. Shard metadata:
``{"step", "kind": "full"|"norms", "params": {layer: [param names]}, "groups": {layer: group}}``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from hf_gradext.store import ShardWriter, list_shards, read_shard_header
from hf_gradext.store.policy import OVERWRITE_OUTPUT_DIR, RESUME_FROM_CHECKPOINT, OutputDir

logger = logging.getLogger(__name__)

PREFIX = "grads"
FLAG = "--gradient_collection_dir"


def collection_output(
    directory: str | os.PathLike,
    flag: str = FLAG,
    overwrite_flag: str = OVERWRITE_OUTPUT_DIR,
    resume_flag: str = RESUME_FROM_CHECKPOINT,
) -> OutputDir:
    """The gradient-collection directory under the output-directory policy (:mod:`hf_gradext.store.policy`).

    Only ``grads-*`` shards are its rows; it has no side files (``analysis/`` output is left alone).
    """
    return OutputDir(Path(os.path.expanduser(directory)), PREFIX, flag, overwrite_flag, resume_flag)


class GradientSink:
    """Packs per-layer pieces of one step into shards of about ``target_shard_bytes`` and streams them.

    Args:
        directory: shard directory (created; must be writable, else ``UserFacingError`` naming the flag).
        rank: process rank (part of every shard name and index row).
        max_queue: shards waiting in memory before ``add`` blocks (bounded host memory).
        target_shard_bytes: a shard is handed to the writer once it holds at least this much.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        rank: int = 0,
        max_queue: int = 2,
        target_shard_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.writer = ShardWriter(directory, PREFIX, rank, max_queue=max_queue, flag=FLAG)
        self.directory = self.writer.directory
        self.rank = rank
        self.target_shard_bytes = target_shard_bytes
        self._tensors: dict[str, Tensor] = {}
        self._rows: list[dict[str, Any]] = []
        self._params: dict[str, list[str]] = {}
        self._groups: dict[str, str] = {}
        self._step: int | None = None
        self._kind = "norms"
        self._bytes = 0

    def add(
        self,
        step: int,
        layer: str,
        tensors: dict[str, Tensor],
        rows: list[dict[str, Any]],
        params: list[str] | None = None,
        group: str | None = None,
    ) -> None:
        """Add one layer's piece (a chunk of samples) of step ``step``; may hand a full shard to the writer."""
        if self._step is not None and (step != self._step or any(k in self._tensors for k in tensors)):
            self._emit()  # one step per shard; a key appears once per shard
        self._step = step
        self._tensors.update(tensors)
        self._rows.extend(rows)
        if group is not None:
            self._groups[layer] = group
        if params:
            self._params.setdefault(layer, []).extend(
                p for p in params if p not in self._params.get(layer, [])
            )
            self._kind = "full"
        self._bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        if self._bytes >= self.target_shard_bytes:
            self._emit()

    def _emit(self) -> None:
        if not self._tensors:
            return
        meta = {"step": self._step, "kind": self._kind, "params": self._params, "groups": self._groups}
        tensors, rows = self._tensors, self._rows
        self._tensors, self._rows, self._params, self._groups = {}, [], {}, {}
        self._bytes, self._kind = 0, "norms"
        self.writer.write(tensors, rows, meta)

    def end_step(self) -> None:
        """Hand the rest of the current step to the writer (does not wait for the disk)."""
        self._emit()
        self._step = None

    def flush(self) -> None:
        """Wait until everything handed over so far is on disk (raises ``StoreWriteError`` on failure)."""
        self.end_step()
        self.writer.flush()

    def close(self) -> None:
        self.end_step()
        self.writer.close()

    def discard(self) -> None:
        """Drop pending pieces without writing (after an error) and stop the writer thread."""
        self._tensors, self._rows, self._params, self._bytes = {}, [], {}, 0
        with contextlib.suppress(Exception):  # the error was already reported once
            self.writer.close()

    @property
    def bytes_written(self) -> int:
        return self.writer.bytes_written


def shard_step(path: str | os.PathLike) -> int:
    """The optimizer step whose rows a shard holds."""
    rows, meta = read_shard_header(path)
    if "step" in meta and meta["step"] is not None:
        return int(meta["step"])
    return max((int(r["step"]) for r in rows), default=-1)


def prune_after_step(directory: str | os.PathLike, rank: int, step: int) -> list[Path]:
    """Delete this rank's shards holding steps after ``step`` (collected after the checkpoint we resume
    from; training will redo those steps, so keeping them would duplicate rows). Returns what was removed."""
    removed = []
    for info in list_shards(directory, PREFIX, rank):
        if shard_step(info.path) > step:
            info.path.unlink(missing_ok=True)
            removed.append(info.path)
    if removed:
        logger.warning(
            "resume at step %d: removed %d gradient shard(s) of rank %d collected after that checkpoint",
            step,
            len(removed),
            rank,
        )
    return removed
