"""Projection outputs on disk: JSON side files, shards of rows, and a memory-mapped loader.

Layout of a projection directory::

    metadata.json            enough to rebuild every matrix (see KroneckerProjector.metadata())
    run_config.json          the arguments of the run
    projection_stats.json    loss, timing, tokens
    run_fingerprint.json     writer, row settings, model weights fingerprints (hf_gradext.store.policy)
    proj-rank000-000000.safetensors ...   shards: tensor "proj" (rows, D) + index rows in the header

Shards go through :class:`hf_gradext.store.ShardWriter` (atomic, background thread). Every index row
carries ``example_id`` (dataset index), ``rank`` and ``step``; ``project`` also stores ``loss`` and a
text ``snippet``.

Memory mapping (``load_projections``): a safetensors file is an 8-byte header length, a JSON header,
then raw row-major tensor bytes, so each shard's ``proj`` tensor is a ``numpy.memmap`` at a known byte
offset, read only when touched. One shard is returned as that memmap directly (zero copy). Several
shards (or rows that must be reordered by example id) are streamed, one shard at a time, into one
consolidated raw file ``.cache/rows-<key>.bin`` in the directory (in the system temp dir if the
directory is read-only), written under a temporary name and renamed, keyed by the shard names and sizes
so new shards invalidate it; the returned tensor is a memmap of that file. Peak RAM is one shard, never
``N x D``; the price is disk space for one copy of the rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_gradext.errors import UserFacingError

# write_json_atomic lives in the store now; re-exported because callers import it from here.
from hf_gradext.store import ShardWriter, list_shards, read_shard_header, write_json_atomic  # noqa: F401
from hf_gradext.store.policy import OutputDir

PREFIX = "proj"
TENSOR_KEY = "proj"
METADATA_FILE = "metadata.json"
RUN_CONFIG_FILE = "run_config.json"
STATS_FILE = "projection_stats.json"

# Files that describe the rows of a projection directory: removed with them (store/policy.py).
SIDE_FILES = (
    METADATA_FILE,
    RUN_CONFIG_FILE,
    "projection_stats*.json",
    ".stats-rank*.json",
    ".cache/rows-*.bin",
)
# Keys of metadata.json that do not determine the rows (left out of the run fingerprint's settings).
_NOT_ROW_SETTINGS = ("package_version",)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# safetensors dtype tag -> (numpy dtype to map the bytes, torch dtype to view them as)
_ST_DTYPES = {
    "BF16": (np.uint16, torch.bfloat16),
    "F16": (np.float16, torch.float16),
    "F32": (np.float32, torch.float32),
    "F64": (np.float64, torch.float64),
}


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """``metadata.json`` of a projection directory, or a one-line error naming the fix."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise UserFacingError(
            f"{path} not found; pass a directory written by `hf-gradext project` or --project_gradients"
        )
    return json.loads(path.read_text())


class ProjectionShardWriter:
    """Buffers projected rows and writes one shard every ``save_interval`` batches (rows never dropped).

    Args:
        directory: output directory. rank: process rank (part of the shard names).
        save_interval: batches per shard. dtype: storage dtype of the rows.
        flag: the flag that set ``directory`` (named in error messages).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        rank: int = 0,
        save_interval: int = 1,
        dtype: torch.dtype = torch.bfloat16,
        flag: str = "--proj_output_dir",
    ) -> None:
        self.writer = ShardWriter(directory, prefix=PREFIX, rank=rank, max_queue=2, flag=flag)
        self.save_interval, self.dtype = max(1, int(save_interval)), dtype
        self._rows: list[torch.Tensor] = []
        self._index: list[dict[str, Any]] = []
        self._batches = 0
        self.rows_written = 0

    def add(self, rows: torch.Tensor, index_rows: list[dict[str, Any]]) -> None:
        """Queue ``rows`` (B, D) with one index dict per row; writes a shard every ``save_interval`` calls."""
        if rows.shape[0] != len(index_rows):
            raise ValueError(f"{rows.shape[0]} rows but {len(index_rows)} index entries")
        self._rows.append(rows.detach().to("cpu", self.dtype))
        self._index.extend(index_rows)
        self._batches += 1
        if self._batches >= self.save_interval:
            self.write_pending()

    def write_pending(self) -> None:
        """Write whatever is buffered as one shard (no-op when empty)."""
        if not self._rows:
            return
        rows = torch.cat(self._rows)  # (n, D)
        self.writer.write({TENSOR_KEY: rows}, self._index, {"rows": int(rows.shape[0])})
        self.rows_written += int(rows.shape[0])
        self._rows, self._index, self._batches = [], [], 0

    def close(self) -> None:
        """Write the remainder and wait until every shard is on disk."""
        self.write_pending()
        self.writer.close()


def projection_output(
    directory: str | os.PathLike, flag: str, overwrite_flag: str, resume_flag: str
) -> OutputDir:
    """A projection directory under the output-directory policy (:mod:`hf_gradext.store.policy`)."""
    return OutputDir(Path(directory), PREFIX, flag, overwrite_flag, resume_flag, SIDE_FILES)


def row_settings(metadata: dict[str, Any]) -> dict[str, Any]:
    """The projector's ``metadata.json`` minus what does not change the rows (the package version)."""
    return {k: v for k, v in metadata.items() if k not in _NOT_ROW_SETTINGS}


def completed_example_ids(directory: str | os.PathLike, prefix: str = PREFIX) -> set[int]:
    """Example ids present in complete shards of ``prefix`` (what a resumed run must skip)."""
    ids: set[int] = set()
    for info in list_shards(directory, prefix):
        rows, _ = read_shard_header(info.path)
        ids.update(int(r["example_id"]) for r in rows)
    return ids


def _tensor_location(path: Path) -> tuple[int, str, tuple[int, ...]]:
    """Byte offset, safetensors dtype tag and shape of the ``proj`` tensor inside one shard."""
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
    entry = header[TENSOR_KEY]
    return 8 + header_len + int(entry["data_offsets"][0]), entry["dtype"], tuple(entry["shape"])


def _memmap(path: Path, offset: int, tag: str, shape: tuple[int, ...], mode: str = "c") -> torch.Tensor:
    np_dtype, torch_dtype = _ST_DTYPES[tag]
    if shape[0] == 0:
        return torch.empty(shape, dtype=torch_dtype)
    # mode "c" (copy-on-write): pages are read lazily and the tensor is writable without touching disk.
    array = np.memmap(path, dtype=np_dtype, mode=mode, offset=offset, shape=shape)
    return torch.from_numpy(array).view(torch_dtype)


def iter_projection_blocks(
    directory: str | os.PathLike,
) -> Iterator[tuple[torch.Tensor, list[dict[str, Any]]]]:
    """``(rows, index_rows)`` per shard, in (rank, seq) order; rows are memory-mapped (lazy)."""
    for info in list_shards(directory, PREFIX):
        index, _ = read_shard_header(info.path)
        offset, tag, shape = _tensor_location(info.path)
        yield _memmap(info.path, offset, tag, shape), index


def _cache_path(directory: Path, shards: list[Path]) -> Path:
    key = hashlib.sha256(
        json.dumps([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in shards]).encode()
    ).hexdigest()[:16]
    cache = directory / ".cache"
    try:
        cache.mkdir(exist_ok=True)
        probe = cache / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:  # read-only projection dir: cache in the temp dir instead
        cache = (
            Path(tempfile.gettempdir())
            / "hf_gradext-cache"
            / hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]
        )
        cache.mkdir(parents=True, exist_ok=True)
    return cache / f"rows-{key}.bin"


def load_projections(
    directory: str | os.PathLike, *, sort_by_id: bool | None = None
) -> tuple[torch.Tensor, list[int], dict[str, Any]]:
    """Load every complete shard of a projection directory, memory-mapped.

    Args:
        directory: a directory written by ``hf-gradext project`` or the training callback.
        sort_by_id: order rows by example id. Default: when the ids are unique (a dataset pass, also
            merged across ranks); otherwise (training over several epochs) rows stay in write order.

    Returns:
        ``(rows, ids, metadata)``: rows (N, D) in the storage dtype, memory-mapped (see module doc),
        ids the N example ids, metadata the parsed ``metadata.json``.
    """
    directory = Path(directory)
    metadata = read_metadata(directory)
    shards = [info.path for info in list_shards(directory, PREFIX)]
    index = [read_shard_header(p)[0] for p in shards]
    ids = [int(r["example_id"]) for rows in index for r in rows]
    if not shards:
        return torch.empty(0, int(metadata["total_proj_dim"])), [], metadata
    unique = len(set(ids)) == len(ids)
    sort = unique if sort_by_id is None else sort_by_id
    if sort and not unique:
        raise UserFacingError(f"{directory} holds duplicated example ids; load with sort_by_id=False")
    locations = [_tensor_location(p) for p in shards]
    tags = {tag for _, tag, _ in locations}
    if len(tags) != 1:
        raise UserFacingError(
            f"shards in {directory} mix dtypes {sorted(tags)}; re-run into a fresh directory"
        )
    tag = tags.pop()
    dim = locations[0][2][1]
    order = np.argsort(np.asarray(ids), kind="stable") if sort else np.arange(len(ids))
    if len(shards) == 1 and np.array_equal(order, np.arange(len(ids))):
        offset, _, shape = locations[0]
        return _memmap(shards[0], offset, tag, shape), ids, metadata
    target = _cache_path(directory, shards)
    if not target.exists():
        destination = np.empty(len(ids), dtype=np.int64)  # destination[source row] = output row
        destination[order] = np.arange(len(ids))
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        out = np.memmap(tmp, dtype=_ST_DTYPES[tag][0], mode="w+", shape=(len(ids), dim))
        start = 0
        for path, (offset, _, shape) in zip(shards, locations):
            src = np.memmap(path, dtype=_ST_DTYPES[tag][0], mode="r", offset=offset, shape=shape)
            out[destination[start : start + shape[0]]] = src  # one shard in RAM at a time
            start += shape[0]
            del src
        out.flush()
        del out
        os.replace(tmp, target)
    rows = _memmap(target, 0, tag, (len(ids), dim))
    return rows, [ids[i] for i in order], metadata


def prune_rows_from_step(directory: str | os.PathLike, rank: int, step: int) -> int:
    """Remove rows with ``step >= step`` from this rank's complete shards (resuming from a checkpoint
    re-runs those steps). Each affected shard is rewritten atomically, or deleted if nothing remains.

    Returns:
        Number of rows removed.
    """
    from hf_gradext.store import read_shard
    from hf_gradext.store.shards import write_shard_atomic

    removed = 0
    for info in list_shards(directory, PREFIX, rank):
        index, _ = read_shard_header(info.path)
        keep = [i for i, r in enumerate(index) if int(r.get("step", -1)) < step]
        if len(keep) == len(index):
            continue
        removed += len(index) - len(keep)
        if not keep:
            info.path.unlink()
            continue
        tensors, index, meta = read_shard(info.path)
        rows = tensors[TENSOR_KEY][keep]
        write_shard_atomic(
            info.path, {TENSOR_KEY: rows}, [index[i] for i in keep], {**meta, "rows": len(keep)}
        )
    return removed
