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
offset, read only when touched; the header is bound-checked against the file size first, so a truncated
shard is an error message, not a ``SIGBUS``. Every shard is verified against its checksum (one
sequential read) before its rows are returned. One shard is returned as that memmap directly (zero
copy). Several shards (or rows that must be reordered by example id) are gathered, 64 MiB at a time,
into one consolidated raw file (:mod:`hf_gradext.projection.row_cache`: ``.cache/rows-<key>.bin`` in the
directory, or the private per-user cache if the directory is read-only or full; written by ordinary
I/O after a free-space check, verified by size and checksum whenever it is reused); the returned tensor
is a memmap of that file. Peak RAM is one chunk, never ``N x D``; the price is disk space for one copy of
the rows.

``metadata.json`` is checked against the row settings the directory's ``run_fingerprint.json`` recorded
when the rows were written (when it has one): a damaged or edited metadata file would rebuild other
projection matrices than the ones that made the rows.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_gradext.errors import UserFacingError

# write_json_atomic lives in the store now; re-exported because callers import it from here.
from hf_gradext.projection.row_cache import cache_key, find_or_build
from hf_gradext.store import ShardWriter, list_shards, read_shard_header, write_json_atomic  # noqa: F401
from hf_gradext.store.disk import disk_errors
from hf_gradext.store.integrity import DamagedFileError, damaged, read_json
from hf_gradext.store.policy import OutputDir, read_fingerprint
from hf_gradext.store.shards import SHARD_FIX, ShardLayout, inspect_shard, verify_bytes

logger = logging.getLogger(__name__)

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
    ".cache/rows-*.json",
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
_VERIFY_CHUNK = 16 * 1024 * 1024
METADATA_FIX = (
    "re-create it: rerun the projection into a fresh directory, or with --overwrite (hf-gradext project) / "
    "--overwrite_output_dir (training)"
)


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """``metadata.json`` of a projection directory, or a one-line error naming the fix."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise UserFacingError(
            f"{path} not found; pass a directory written by `hf-gradext project` or --project_gradients"
        )
    metadata = read_json(path, METADATA_FIX)
    if not isinstance(metadata, dict) or not isinstance(metadata.get("total_proj_dim"), int):
        raise damaged(path, "no integer total_proj_dim", METADATA_FIX)
    _check_against_fingerprint(path, metadata)
    return metadata


def _check_against_fingerprint(path: Path, metadata: dict[str, Any]) -> None:
    """``metadata.json`` must equal the row settings recorded when the rows were written (if recorded)."""
    try:
        recorded = (read_fingerprint(path.parent) or {}).get("settings")
    except DamagedFileError as exc:  # the cross-check is lost, the metadata itself may be fine
        logger.warning("cannot cross-check %s: %s", path.name, exc)
        return
    if not isinstance(recorded, dict):
        return
    plain = json.loads(json.dumps(row_settings(metadata), default=str))
    changed = [k for k in plain if k in recorded and recorded[k] != plain[k]]
    if changed:
        raise damaged(
            path,
            f"{', '.join(changed[:3])} differ from what run_fingerprint.json recorded when the rows were written",
            METADATA_FIX,
        )


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
    """The projector's ``metadata.json`` minus what does not change the rows (the package version, and
    where the preconditioning's optimizer state was read: its ``state_sha256`` is what matters)."""
    out = {k: v for k, v in metadata.items() if k not in _NOT_ROW_SETTINGS}
    if isinstance(out.get("preconditioning"), dict):
        out["preconditioning"] = {k: v for k, v in out["preconditioning"].items() if k != "source"}
    return out


def completed_example_ids(directory: str | os.PathLike, prefix: str = PREFIX) -> set[int]:
    """Example ids present in complete shards of ``prefix`` (what a resumed run must skip)."""
    ids: set[int] = set()
    for info in list_shards(directory, prefix):
        rows, _ = read_shard_header(info.path)
        ids.update(int(r["example_id"]) for r in rows)
    return ids


def _layouts(shards: list[Path]) -> list[ShardLayout]:
    """Verified headers of ``shards``, each checked to hold a 2-D ``proj`` tensor."""
    layouts = []
    for path in shards:
        layout = inspect_shard(path)
        entry = layout.header.tensors.get(TENSOR_KEY)
        if entry is None or len(entry.shape) != 2 or entry.dtype not in _ST_DTYPES:
            raise damaged(path, f"no 2-D {TENSOR_KEY!r} tensor of a float dtype", SHARD_FIX)
        if entry.shape[0] != len(layout.rows):
            raise damaged(path, f"{entry.shape[0]} rows but {len(layout.rows)} index entries", SHARD_FIX)
        layouts.append(layout)
    return layouts


def _memmap(path: Path, offset: int, tag: str, shape: tuple[int, ...], mode: str = "c") -> torch.Tensor:
    np_dtype, torch_dtype = _ST_DTYPES[tag]
    if shape[0] == 0:
        return torch.empty(shape, dtype=torch_dtype)
    # mode "c" (copy-on-write): pages are read lazily and the tensor is writable without touching disk.
    # The file size was checked against the header first (parse_header): no page lies past its end.
    array = np.memmap(path, dtype=np_dtype, mode=mode, offset=offset, shape=shape)
    return torch.from_numpy(array).view(torch_dtype)


def _raw(layout: ShardLayout) -> np.ndarray:
    """The ``proj`` rows of a shard as a read-only memmap of their raw storage dtype."""
    entry = layout.header.tensors[TENSOR_KEY]
    if entry.shape[0] == 0:
        return np.empty(entry.shape, dtype=_ST_DTYPES[entry.dtype][0])
    return np.memmap(
        layout.header.path, dtype=_ST_DTYPES[entry.dtype][0], mode="r", offset=entry.start, shape=entry.shape
    )


def _verify(layout: ShardLayout) -> None:
    """One sequential pass over the shard's rows against their checksum (format 2 shards)."""
    if layout.checksums is None:
        return
    raw = _raw(layout)
    step = max(1, _VERIFY_CHUNK // max(raw.strides[0], 1))
    verify_bytes(layout, TENSOR_KEY, (raw[i : i + step] for i in range(0, raw.shape[0], step)))


def iter_projection_blocks(
    directory: str | os.PathLike,
) -> Iterator[tuple[torch.Tensor, list[dict[str, Any]]]]:
    """``(rows, index_rows)`` per shard, in (rank, seq) order; rows are memory-mapped, each shard verified
    against its checksum first (one sequential read)."""
    for info in list_shards(directory, PREFIX):
        (layout,) = _layouts([info.path])
        _verify(layout)
        entry = layout.header.tensors[TENSOR_KEY]
        yield _memmap(info.path, entry.start, entry.dtype, entry.shape), layout.rows


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

    Raises:
        DamagedFileError: a shard, ``metadata.json`` or ... is damaged (one line naming the file).
        UserFacingError: no room for the row cache (names the locations and ``$HF_GRADEXT_CACHE``).
    """
    directory = Path(directory)
    metadata = read_metadata(directory)
    shards = [info.path for info in list_shards(directory, PREFIX)]
    layouts = _layouts(shards)
    try:
        ids = [int(r["example_id"]) for layout in layouts for r in layout.rows]
    except (KeyError, TypeError, ValueError):
        raise UserFacingError(
            f"shards in {directory} have index rows without an integer example_id"
        ) from None
    if not shards:
        return torch.empty(0, int(metadata["total_proj_dim"])), [], metadata
    unique = len(set(ids)) == len(ids)
    sort = unique if sort_by_id is None else sort_by_id
    if sort and not unique:
        raise UserFacingError(f"{directory} holds duplicated example ids; load with sort_by_id=False")
    entries = [layout.header.tensors[TENSOR_KEY] for layout in layouts]
    tags = {entry.dtype for entry in entries}
    dims = {entry.shape[1] for entry in entries}
    if len(tags) != 1 or len(dims) != 1:
        raise UserFacingError(
            f"shards in {directory} mix dtypes {sorted(tags)} / row widths {sorted(dims)}; re-run into a fresh directory"
        )
    tag, dim = tags.pop(), dims.pop()
    order = np.argsort(np.asarray(ids), kind="stable") if sort else np.arange(len(ids))
    if len(shards) == 1 and np.array_equal(order, np.arange(len(ids))):
        _verify(layouts[0])
        return _memmap(shards[0], entries[0].start, tag, entries[0].shape), ids, metadata
    np_dtype = _ST_DTYPES[tag][0]
    row_bytes = dim * np.dtype(np_dtype).itemsize
    starts = np.cumsum([0] + [entry.shape[0] for entry in entries])
    verified: set[int] = set()

    def fill(first: int, stop: int) -> np.ndarray:
        source = order[first:stop]  # global source row of each output row
        shard_of = np.searchsorted(starts, source, side="right") - 1
        block = np.empty((stop - first, dim), dtype=np_dtype)
        for k in np.unique(shard_of):
            if k not in verified:  # each shard checked once, before any of its rows is used
                _verify(layouts[k])
                verified.add(int(k))
            mask = shard_of == k
            block[mask] = _raw(layouts[k])[source[mask] - starts[k]]
        return block

    target = find_or_build(directory, cache_key(shards, sort), len(ids), row_bytes, fill)
    rows = _memmap(target, 0, tag, (len(ids), dim))
    return rows, [ids[i] for i in order], metadata


def prune_rows_from_step(
    directory: str | os.PathLike, rank: int, step: int, flag: str = "--proj_output_dir"
) -> int:
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
        with disk_errors(directory, flag):
            write_shard_atomic(
                info.path, {TENSOR_KEY: rows}, [index[i] for i in keep], {**meta, "rows": len(keep)}
            )
    return removed
