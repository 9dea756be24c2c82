"""The consolidated row file behind :func:`hf_gradext.projection.load_projections`: built safely, verified.

Several shards (or rows reordered by example id) become one raw row-major file ``rows-<key>.bin`` that is
returned memory-mapped; ``<key>`` hashes the shard names, sizes and mtimes and the row order, so new
shards (or another order) mean another file. Next to it, ``rows-<key>.json`` records its size and checksum
(:mod:`hf_gradext.store.integrity`).

Safety, each point a failure seen before:

* the file is written with ordinary ``write`` calls, never through a writable memory map: on a full disk a
  write raises ``ENOSPC`` (an error message, the temporary removed), where a map's page fault is a
  ``SIGBUS`` that kills the process with no message and leaves the temporary behind;
* the free space is checked (``shutil.disk_usage``) before the first byte, and the location chosen
  accordingly: the projection directory's ``.cache/``, else the private per-user cache
  (:func:`hf_gradext.store.cache_dir.private_dir`, mode 0700, never a shared ``/tmp`` path);
* stale temporaries of dead processes are removed from the cache directory first;
* a cached file is used only when its size and checksum match its record; otherwise it is removed (with a
  warning) and rebuilt from the shards, which are verified against their own checksums while it is built.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from hf_gradext.errors import UserFacingError
from hf_gradext.store.cache_dir import ENV as CACHE_ENV
from hf_gradext.store.cache_dir import private_dir
from hf_gradext.store.disk import DiskError, disk_error, free_bytes, is_disk_error
from hf_gradext.store.integrity import checksum_matches, new_hasher, read_json
from hf_gradext.store.shards import write_json_atomic
from hf_gradext.store.temp import remove_stale_temporaries, temp_path

logger = logging.getLogger(__name__)

FORMAT = 1
CHUNK_BYTES = 64 * 1024 * 1024  # rows gathered and written at a time (peak RAM of a build)
MARGIN_BYTES = 16 * 1024 * 1024  # left free on the disk after the cache is written


def cache_key(shards: list[Path], sort: bool) -> str:
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in shards]
    return hashlib.sha256(json.dumps([stamp, bool(sort)]).encode()).hexdigest()[:16]


def _candidates(directory: Path) -> list[Path]:
    """Where a cache may live, in order of preference (each created if possible)."""
    found = []
    local = directory / ".cache"
    try:
        local.mkdir(exist_ok=True)
        probe = local / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        found.append(local)
    except OSError:  # read-only projection directory (or .cache is a file): the user cache only
        pass
    try:
        found.append(private_dir("rows", hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]))
    except UserFacingError as exc:
        logger.warning("the per-user cache cannot hold the row cache: %s", exc)
    return found


def _record_path(target: Path) -> Path:
    return target.with_suffix(".json")


def _chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(16 * 1024 * 1024):
            yield chunk


def _valid(target: Path, size: int) -> bool:
    """Whether ``target`` is a complete cache of ``size`` bytes whose checksum matches its record."""
    record_path = _record_path(target)
    if not target.is_file() and not record_path.is_file():
        return False
    reason = None
    try:
        record = read_json(record_path, "it is rebuilt")
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            reason = "unknown record"
        elif target.stat().st_size != size or record.get("size") != size:
            reason = f"{target.stat().st_size} bytes, expected {size}"
        elif not checksum_matches(_chunks(target), record.get("checksum")):
            reason = "checksum mismatch"
    except (UserFacingError, OSError) as exc:
        reason = str(exc)
    if reason is None:
        return True
    logger.warning("row cache %s is not usable (%s): removed, rebuilding it from the shards", target, reason)
    for stale in (target, record_path):
        with contextlib.suppress(OSError):
            stale.unlink()
    return False


def find_or_build(
    directory: Path,
    key: str,
    n_rows: int,
    row_bytes: int,
    fill: Callable[[int, int], np.ndarray],
) -> Path:
    """The path of a verified cache file of ``n_rows`` rows, building it when needed.

    Args:
        directory: the projection directory (its ``.cache/`` is the first choice).
        key: :func:`cache_key` of the shards and the order.
        n_rows / row_bytes: the file's shape (``row_bytes`` per row).
        fill: ``fill(start, stop)`` returns output rows ``[start, stop)`` as a C-contiguous array.

    Raises:
        UserFacingError: no candidate location has room (names both and ``$HF_GRADEXT_CACHE``), or the
            disk filled up while writing (the temporary is removed).
    """
    size = n_rows * row_bytes
    candidates = _candidates(directory)
    for place in candidates:
        remove_stale_temporaries(place)
        if _valid(place / f"rows-{key}.bin", size):
            return place / f"rows-{key}.bin"
    need = size + MARGIN_BYTES
    roomy = [p for p in candidates if free_bytes(p) >= need]
    if not roomy:
        where = (
            ", ".join(f"{p} ({free_bytes(p) / 2**20:.1f} MiB free)" for p in candidates) or "nowhere writable"
        )
        raise UserFacingError(
            f"loading {n_rows} rows of {directory} needs a {need / 2**20:.1f} MiB row cache but no cache location "
            f"has room ({where}); free disk space or set {CACHE_ENV} to a directory with room"
        )
    target = roomy[0] / f"rows-{key}.bin"
    _write(target, n_rows, row_bytes, fill)
    return target


def _write(target: Path, n_rows: int, row_bytes: int, fill: Callable[[int, int], np.ndarray]) -> None:
    tmp = temp_path(target)
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    hasher = new_hasher()
    try:
        with open(tmp, "wb") as handle:
            for start in range(0, n_rows, step):
                block = np.ascontiguousarray(fill(start, min(start + step, n_rows)))
                handle.write(memoryview(block).cast("B"))
                hasher.update(block)
            handle.flush()
            os.fsync(handle.fileno())
        size = n_rows * row_bytes
        write_json_atomic(
            _record_path(target),
            {"format": FORMAT, "size": size, "checksum": hasher.hexdigest()},
        )
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and is_disk_error(exc):
            raise disk_error(target.parent, CACHE_ENV, exc, "writing the row cache to") from None
        if isinstance(exc, DiskError):  # write_json_atomic's disk error: name the way out
            raise DiskError(f"{exc}; or set {CACHE_ENV} to a directory with room") from None
        raise
