"""Sharded safetensors storage with an asynchronous, atomic writer.

A shard is one safetensors file holding a dict of tensors plus, in its header metadata, the index rows
that describe it (one JSON object per stored row: optimizer step, dataset example id, rank, ...) and
free-form shard metadata. Keeping the index *inside* the shard means data and index are written in one
atomic step: a shard either exists complete, with its index, or not at all.

Atomicity: each shard is written to a hidden temporary name in the same directory, flushed with
``fsync``, then ``os.replace``d to its final name. Readers only ever look at final names, so a killed
process or a full disk leaves at worst a stale temporary file, which the next writer removes.

Shard names are ``{prefix}-rank{rank:03d}-{seq:06d}.safetensors``; a resumed writer continues the
sequence after the last complete shard of its rank, so numbering never collides.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hf_gradext.errors import UserFacingError

logger = logging.getLogger(__name__)

ROWS_KEY = "hf_gradext_rows"
META_KEY = "hf_gradext_meta"
_SHARD_RE = re.compile(r"^(?P<prefix>.+)-rank(?P<rank>\d{3})-(?P<seq>\d{6})\.safetensors$")


class StoreWriteError(UserFacingError):
    """A shard could not be written (disk full, permissions, ...). Completed shards are intact."""


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    prefix: str
    rank: int
    seq: int


def shard_name(prefix: str, rank: int, seq: int) -> str:
    return f"{prefix}-rank{rank:03d}-{seq:06d}.safetensors"


def list_shards(
    directory: str | os.PathLike, prefix: str | None = None, rank: int | None = None
) -> list[ShardInfo]:
    """Complete shards in ``directory`` (temporary files are never listed), sorted by (rank, seq)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _SHARD_RE.match(entry.name)
        if not match:
            continue
        info = ShardInfo(entry, match["prefix"], int(match["rank"]), int(match["seq"]))
        if (prefix is None or info.prefix == prefix) and (rank is None or info.rank == rank):
            found.append(info)
    return sorted(found, key=lambda s: (s.prefix, s.rank, s.seq))


def read_shard_header(path: str | os.PathLike) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Index rows and shard metadata of one shard, without loading any tensor."""
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
    return json.loads(header.get(ROWS_KEY, "[]")), json.loads(header.get(META_KEY, "{}"))


def read_shard(
    path: str | os.PathLike, keys: list[str] | None = None
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], dict[str, Any]]:
    """Load a shard: (tensors, index rows, metadata). ``keys`` restricts which tensors are read."""
    tensors = {}
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
        for key in handle.keys() if keys is None else keys:
            tensors[key] = handle.get_tensor(key)
    return tensors, json.loads(header.get(ROWS_KEY, "[]")), json.loads(header.get(META_KEY, "{}"))


def iter_index(directory: str | os.PathLike, prefix: str | None = None) -> Iterator[dict[str, Any]]:
    """Every index row of every complete shard, each extended with ``shard`` (file name) and ``row``
    (its position within the shard)."""
    for info in list_shards(directory, prefix):
        rows, _ = read_shard_header(info.path)
        for position, row in enumerate(rows):
            yield {**row, "shard": info.path.name, "row": position}


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on every platform / filesystem
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_shard_atomic(
    path: Path, tensors: dict[str, torch.Tensor], rows: list[dict[str, Any]], meta: dict[str, Any]
) -> None:
    """Write one shard to a temporary name, fsync, and rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    header = {ROWS_KEY: json.dumps(rows), META_KEY: json.dumps(meta), "format": "pt"}
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=header)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to a temporary name, fsync, and rename it into place: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as handle:
            handle.write(json.dumps(obj, indent=1, sort_keys=False, default=str))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def ensure_writable_dir(directory: str | os.PathLike, flag: str) -> Path:
    """Create ``directory`` and prove it is writable, or raise a one-line error naming ``flag``."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserFacingError(f"{flag}={directory} is a file, not a directory; pass a directory path")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserFacingError(
            f"{flag}={directory} is not writable ({exc.strerror or exc}); choose a writable directory"
        ) from None
    return directory


_STOP = object()


class ShardWriter:
    """Writes shards from a background thread so the caller waits on disk only when the queue is full.

    Args:
        directory: where shards go (created; must be writable).
        prefix: shard name prefix (one writer per prefix and rank).
        rank: process rank, part of the shard name, so ranks never collide.
        max_queue: shards that may wait in memory; ``write`` blocks beyond that (bounded memory).
        flag: the command-line flag that set ``directory``, named in error messages.

    Errors raised in the background thread are re-raised, as :class:`StoreWriteError`, by the next
    ``write``, ``flush`` or ``close``. After an error the writer accepts nothing more.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        prefix: str = "shard",
        rank: int = 0,
        max_queue: int = 2,
        flag: str = "output directory",
    ) -> None:
        if "/" in prefix or not prefix:
            raise UserFacingError(f"shard prefix {prefix!r} must be a non-empty file-name part")
        self.directory = ensure_writable_dir(directory, flag)
        self.prefix, self.rank, self.flag = prefix, rank, flag
        self._remove_stale_temporaries()
        existing = list_shards(self.directory, prefix, rank)
        self.next_seq = existing[-1].seq + 1 if existing else 0
        self.written: list[Path] = []
        self.bytes_written = 0
        self._error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_queue))
        self._thread = threading.Thread(target=self._run, name=f"ShardWriter-{prefix}", daemon=True)
        self._thread.start()

    def _remove_stale_temporaries(self) -> None:
        for stale in self.directory.glob(f".{self.prefix}-rank{self.rank:03d}-*.tmp-*"):
            stale.unlink(missing_ok=True)

    @property
    def failed(self) -> bool:
        return self._error is not None

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            last = self.written[-1].name if self.written else "none"
            raise StoreWriteError(
                f"writing shards to {self.flag}={self.directory} failed ({self._error}); "
                f"complete shards are intact (last written: {last}); free disk space or choose another directory"
            ) from self._error

    def write(
        self,
        tensors: dict[str, torch.Tensor],
        rows: list[dict[str, Any]] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Path:
        """Queue one shard; returns the final path it will have. Tensors are copied to CPU first."""
        self._raise_if_failed()
        if not self._thread.is_alive():
            raise StoreWriteError(f"the shard writer for {self.directory} is closed; create a new one")
        path = self.directory / shard_name(self.prefix, self.rank, self.next_seq)
        self.next_seq += 1
        # Detach from autograd and the device now: the caller may reuse its buffers right away.
        cpu = {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}
        self._queue.put((path, cpu, list(rows or []), dict(meta or {})))
        return path

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self._error is not None:
                    continue  # drain without writing: nothing after a failure may land
                path, tensors, rows, meta = item
                try:
                    write_shard_atomic(path, tensors, rows, meta)
                    self.written.append(path)
                    self.bytes_written += path.stat().st_size
                except BaseException as exc:  # disk full, permissions, ...
                    logger.error("shard %s could not be written: %s", path.name, exc)
                    self._error = exc
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        """Wait until every queued shard is on disk."""
        self._queue.join()
        self._raise_if_failed()

    def close(self) -> None:
        """Flush and stop the background thread (idempotent)."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._raise_if_failed()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
