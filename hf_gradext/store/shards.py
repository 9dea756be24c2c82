"""Sharded safetensors storage with an asynchronous, atomic writer and checksummed tensors.

A shard is one safetensors file holding a dict of tensors plus, in its header metadata, the index rows
that describe it (one JSON object per stored row: optimizer step, dataset example id, rank, ...) and
free-form shard metadata. Keeping the index *inside* the shard means data and index are written in one
atomic step: a shard either exists complete, with its index, or not at all.

Atomicity: each shard is written to a hidden temporary name in the same directory, flushed with
``fsync``, then ``os.replace``d to its final name. Readers only ever look at final names, so a killed
process or a full disk leaves at worst a stale temporary file, which the next writer removes.

Integrity (format 2): the header also carries ``hf_gradext_format`` (``"2"``), per tensor a checksum of
its bytes (:mod:`hf_gradext.store.integrity`: XXH3-128; fl64 or CRC-32 in files of earlier versions)
with its dtype and shape (``hf_gradext_checksums``), and a checksum over the index rows, the metadata and
those checksums (``hf_gradext_header_crc``). The writer hashes each slice of a tensor right after writing
it (one pass over bytes still in the cache); :func:`read_shard` verifies every tensor it returns and
:func:`read_shard_header` the header, so a flipped bit or a truncated file is a one-line error naming the shard, never a number used silently.
Shards of format 1 (no ``hf_gradext_format`` key, written before checksums existed) still load; there is
nothing to verify them against.

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
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from hf_gradext.errors import UserFacingError
from hf_gradext.store.disk import DiskError, disk_error, ensure_writable_dir, is_disk_error
from hf_gradext.store.integrity import bytes_checksum, checksum_matches, damaged, tensor_bytes
from hf_gradext.store.safetensors_file import (
    DTYPE_TAGS,
    Header,
    parse_header,
    write_safetensors,
)
from hf_gradext.store.temp import temp_path

logger = logging.getLogger(__name__)

ROWS_KEY = "hf_gradext_rows"
META_KEY = "hf_gradext_meta"
FORMAT_KEY = "hf_gradext_format"
CHECKSUMS_KEY = "hf_gradext_checksums"
HEADER_CRC_KEY = "hf_gradext_header_crc"
FORMAT = 2
# Benchmarks switch this off to measure what the checksums cost (recipes/benchmarks/bench_collection.py).
WRITE_CHECKSUMS = True
SHARD_FIX = "delete this shard (the other shards are intact) and write its rows again, e.g. rerun with the resume flag"
_SHARD_RE = re.compile(r"^(?P<prefix>.+)-rank(?P<rank>\d{3})-(?P<seq>\d{6})\.safetensors$")


class StoreWriteError(DiskError):
    """A shard could not be written (disk full, permissions, ...). Completed shards are intact."""


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    prefix: str
    rank: int
    seq: int


@dataclass(frozen=True)
class ShardLayout:
    """A shard's verified header: where each tensor lies, its index rows, metadata and checksums."""

    header: Header
    rows: list[dict[str, Any]]
    meta: dict[str, Any]
    checksums: dict[str, dict[str, Any]] | None  # None: format 1, nothing to verify against


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


# ---------------------------------------------------------------------------------------------- checksums
def _header_parts(rows: str, meta: str, sums: str) -> list[bytes]:
    return [rows.encode(), b"\n", meta.encode(), b"\n", sums.encode()]


def _header_crc(rows: str, meta: str, sums: str) -> str:
    return bytes_checksum(_header_parts(rows, meta, sums))


def _tensor_record(tensor: torch.Tensor, checksum: str) -> dict[str, Any]:
    return {"checksum": checksum, "dtype": DTYPE_TAGS[tensor.dtype], "shape": list(tensor.shape)}


def inspect_shard(path: str | os.PathLike) -> ShardLayout:
    """Parse, bound-check and (format 2) verify a shard's header; no tensor byte is read.

    Raises:
        DamagedFileError: truncated, unparsable, or the header fails its checksum (names the shard).
    """
    path = Path(path)
    header = parse_header(path, SHARD_FIX)
    md = header.metadata
    rows_json, meta_json = md.get(ROWS_KEY, "[]"), md.get(META_KEY, "{}")
    checksums = None
    ours = [k for k in (FORMAT_KEY, CHECKSUMS_KEY, HEADER_CRC_KEY) if k in md]
    if ours:
        if len(ours) != 3:  # a flipped bit in one key name must not turn a shard into an unverified one
            raise damaged(path, f"integrity keys incomplete (found {', '.join(ours)})", SHARD_FIX)
        version = md[FORMAT_KEY]
        if not version.isdigit():
            raise damaged(path, f"format {version!r} is not a number", SHARD_FIX)
        if int(version) > FORMAT:
            raise UserFacingError(
                f"{path} has shard format {version}, newer than this hf_gradext reads ({FORMAT}); upgrade hf_gradext"
            )
        if not checksum_matches(_header_parts(rows_json, meta_json, md[CHECKSUMS_KEY]), md[HEADER_CRC_KEY]):
            raise damaged(path, "the index rows or metadata fail their checksum", SHARD_FIX)
        checksums = json.loads(md[CHECKSUMS_KEY])
        if set(checksums) != set(header.tensors):
            raise damaged(path, "the tensors do not match the checksummed list", SHARD_FIX)
        for key, entry in header.tensors.items():
            record = checksums[key]
            if record.get("dtype") != entry.dtype or tuple(record.get("shape", ())) != entry.shape:
                raise damaged(
                    path,
                    f"tensor {key!r} is {entry.dtype}{list(entry.shape)} but was written as "
                    f"{record.get('dtype')}{record.get('shape')}",
                    SHARD_FIX,
                )
    try:
        rows, meta = json.loads(rows_json), json.loads(meta_json)
    except ValueError:
        raise damaged(path, "the index rows or metadata are not JSON", SHARD_FIX) from None
    return ShardLayout(header, rows, meta, checksums)


def verify_bytes(layout: ShardLayout, key: str, chunks: Iterable[Any]) -> None:
    """Check the bytes of tensor ``key`` (given as buffers) against its checksum (format 2 only)."""
    if layout.checksums is None:
        return
    if not checksum_matches(chunks, layout.checksums[key].get("checksum")):
        raise damaged(layout.header.path, f"tensor {key!r} fails its checksum", SHARD_FIX)


# ------------------------------------------------------------------------------------------------ readers
def read_shard_header(path: str | os.PathLike) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Index rows and shard metadata of one shard (header verified), without loading any tensor."""
    layout = inspect_shard(path)
    return layout.rows, layout.meta


def read_shard(
    path: str | os.PathLike, keys: list[str] | None = None, verify: bool = True
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], dict[str, Any]]:
    """Load a shard: (tensors, index rows, metadata). ``keys`` restricts which tensors are read.

    Every tensor returned is checked against its checksum (``verify=False`` skips that, never the header
    checks).

    Raises:
        DamagedFileError: the shard is truncated, unparsable or fails a checksum (names the shard).
    """
    layout = inspect_shard(path)
    wanted = list(layout.header.tensors) if keys is None else list(keys)
    absent = [k for k in wanted if k not in layout.header.tensors]
    if absent:
        raise UserFacingError(f"{path} has no tensor {absent[0]!r} (it has {sorted(layout.header.tensors)})")
    tensors = {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in wanted:
                tensors[key] = handle.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise damaged(
            path, str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__, SHARD_FIX
        ) from None
    if verify:
        for key, tensor in tensors.items():
            verify_bytes(layout, key, [tensor_bytes(tensor)])
    return tensors, layout.rows, layout.meta


def iter_index(directory: str | os.PathLike, prefix: str | None = None) -> Iterator[dict[str, Any]]:
    """Every index row of every complete shard, each extended with ``shard`` (file name) and ``row``
    (its position within the shard)."""
    for info in list_shards(directory, prefix):
        rows, _ = read_shard_header(info.path)
        for position, row in enumerate(rows):
            yield {**row, "shard": info.path.name, "row": position}


# ------------------------------------------------------------------------------------------------ writers
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
    path: Path,
    tensors: dict[str, torch.Tensor],
    rows: list[dict[str, Any]],
    meta: dict[str, Any],
    checksums: bool | None = None,
) -> float:
    """Write one shard to a temporary name, fsync, and rename it into place.

    Args:
        checksums: write checksums (default :data:`WRITE_CHECKSUMS`).

    Returns:
        CPU seconds spent hashing (part of the write).
    """
    path = Path(path)
    tmp = temp_path(path)
    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
    rows_json, meta_json = json.dumps(rows), json.dumps(meta)

    def metadata_for(sums: dict[str, str] | None) -> dict[str, str]:
        header = {ROWS_KEY: rows_json, META_KEY: meta_json, "format": "pt"}
        if sums is None:
            return header
        records = json.dumps({k: _tensor_record(contiguous[k], sums[k]) for k in sorted(contiguous)})
        crc = _header_crc(rows_json, meta_json, records)  # fixed width: placeholder pass included
        return {**header, FORMAT_KEY: str(FORMAT), CHECKSUMS_KEY: records, HEADER_CRC_KEY: crc}

    try:
        with open(tmp, "wb") as handle:
            hashing = write_safetensors(
                handle, contiguous, metadata_for, WRITE_CHECKSUMS if checksums is None else checksums
            )
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return hashing


def write_json_atomic(path: str | os.PathLike, obj: Any, flag: str = "") -> None:
    """Write JSON to a temporary name, fsync, and rename it into place: a reader never sees half a file.

    Raises:
        StoreWriteError: the disk is full or read-only (one line naming ``path`` and ``flag``).
    """
    path = Path(path)
    text = json.dumps(obj, indent=1, sort_keys=False, default=str)  # before the file exists: no half file
    tmp = temp_path(path)
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and is_disk_error(exc):
            raise StoreWriteError(str(disk_error(path, flag, exc))) from exc
        raise


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
        self.seconds_writing = 0.0  # whole shard writes (checksums, serialization, fsync, rename)
        self.seconds_checksumming = 0.0  # CPU hashing, the part of seconds_writing the checksums cost
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
        cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
        self._queue.put((path, cpu, list(rows or []), dict(meta or {}), WRITE_CHECKSUMS))
        return path

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self._error is not None:
                    continue  # drain without writing: nothing after a failure may land
                path, tensors, rows, meta, sums = item
                try:
                    start = time.perf_counter()
                    hashing = write_shard_atomic(path, tensors, rows, meta, checksums=sums)
                    self.seconds_writing += time.perf_counter() - start
                    self.seconds_checksumming += hashing
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
