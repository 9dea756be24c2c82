"""Blocks read lazily, chunk by chunk, for passes that must not tokenize a whole dataset first.

``hf-gradext project`` comes here with ``--streaming`` (documents read through ``datasets`` streaming:
a Hub dataset, a local dataset folder or local text/json/csv files; nothing whole on disk or in memory)
and with ``--max_samples`` in either mode (only as many runs of :data:`CHUNK_DOCUMENTS` documents are
tokenized as the first N blocks need).

The blocks and example ids are exactly those of :func:`~hf_gradext.data.blocks.tokenize_and_group` on the
same split without ``--preprocessing_num_workers``: the same tokenization, the same runs of 1000 documents
(each run's remainder dropped), ids counting from 0, and the same ``--validation_split_percentage``
hold-out (the first percent of the documents), which needs the number of documents: a local source is
counted (one extra read), a Hub dataset's comes from its metadata, and without either it is refused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

from hf_gradext.data.blocks import CHUNK_DOCUMENTS, EXAMPLE_ID_COLUMN, iter_block_chunks, text_column
from hf_gradext.errors import UserFacingError
from hf_gradext.integrations.hf_datasets import read_chunk_options, resolve_features

logger = logging.getLogger(__name__)

# Bytes the datasets text / json builders read per step of a streamed local file (their default: 10 MiB).
# Each read becomes a list of lines and an Arrow table at once, ~4x its size in transient memory; at
# 10 MiB those swings made about half of the upward drift of a long pass's resident set (docs/projection.md).
STREAM_READ_BYTES = 1 << 20


@dataclass
class DocumentSource:
    """One split's text values, in order: documents ``[start, stop)`` of a stream read from the start by
    every :meth:`open`.

    ``resolve`` (when set) finds ``(start, stop)`` by counting the stream's documents, for a hold-out cut
    that needs the length; it runs on the first :meth:`open`, not when the source is made.
    """

    values: Callable[[], Iterable[Any]]  # a fresh iterator over the text column of the whole stream
    name: str  # what the messages call the data
    length: int | None = None  # documents in this split, when known
    start: int = 0
    stop: int | None = None
    resolve: Callable[[], tuple[int, int | None, int]] | None = None  # -> (start, stop, length)

    def open(self) -> Iterator[Any]:
        if self.resolve is not None:
            self.start, self.stop, self.length = self.resolve()
            self.resolve = None  # counted once per process
        return islice(iter(self.values()), self.start, self.stop)


@dataclass
class BlockStream:
    """The blocks of a :class:`DocumentSource`, as ``{"example_id", "input_ids", "labels"}`` dicts.

    Iterating reads and tokenizes one chunk of documents at a time and stops reading once ``max_blocks``
    blocks are out. ``documents_read`` and ``blocks_made`` say how far the last iteration got.
    """

    source: DocumentSource
    tokenizer: Any
    block_size: int
    max_blocks: int | None = None
    split_name: str = "train"
    documents_read: int = 0
    blocks_made: int = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.documents_read = self.blocks_made = 0
        for chunk in iter_block_chunks(self._counted(self.source.open()), self.tokenizer, self.block_size):
            for ids, labels in zip(chunk["input_ids"], chunk["labels"]):
                if self._full():
                    return
                yield {EXAMPLE_ID_COLUMN: self.blocks_made, "input_ids": ids, "labels": labels}
                self.blocks_made += 1
            if self._full():  # the next chunk is not read at all
                return
        if self.blocks_made == 0:
            raise UserFacingError(
                f"the {self.split_name} set has fewer tokens than one block of --block_size {self.block_size}; "
                "use a smaller --block_size or more data"
            )

    def _full(self) -> bool:
        return self.max_blocks is not None and self.blocks_made >= self.max_blocks

    def _counted(self, documents: Iterable[Any]) -> Iterator[Any]:
        for doc in documents:
            self.documents_read += 1
            yield doc


def blocks_dataset(stream: BlockStream) -> Any:
    """The blocks of ``stream`` as an in-memory ``datasets.Dataset`` (for small passes and tests)."""
    from datasets import Dataset

    columns: dict[str, list[Any]] = {"input_ids": [], "labels": [], EXAMPLE_ID_COLUMN: []}
    for block in stream:
        for key, values in columns.items():
            values.append(block[key])
    return Dataset.from_dict(columns)


# ------------------------------------------------------------------ sources
def no_validation_error() -> UserFacingError:
    return UserFacingError(
        "--split validation: the data has no validation split; set --validation_split_percentage"
    )


def arrow_source(margs: Any, split: str) -> DocumentSource:
    """The ``split`` of :func:`~hf_gradext.data.load_raw_datasets` (memory-mapped Arrow), read in chunks."""
    from hf_gradext.data.loading import load_raw_datasets

    raw = load_raw_datasets(margs)
    column = getattr(margs, "text_column", None)
    for part in raw.values():  # a wrong column fails now, as in build_datasets
        if part is not None:
            text_column(part, column)
    data = raw[split]
    if data is None:
        raise no_validation_error()
    col = text_column(data, column)

    def values() -> Iterator[Any]:
        for first in range(0, len(data), CHUNK_DOCUMENTS):
            yield from data[first : first + CHUNK_DOCUMENTS][col]

    return DocumentSource(values, name=f"the {split} split", length=len(data))


def streaming_source(margs: Any, split: str) -> DocumentSource:
    """The ``split`` read through ``datasets`` streaming; refuses what streaming cannot reproduce.

    Cheap (no document is tokenized; at most the first row of each split is read to learn its columns),
    so it runs before the model is loaded.
    """
    from hf_gradext.data.loading import is_embedded

    if is_embedded(margs):  # the embedded corpus is in memory anyway: same blocks either way
        return arrow_source(margs, split)
    streams, name, local = _open_streams(margs)
    column = getattr(margs, "text_column", None)
    cols = {part: text_column(stream, column) for part, stream in streams.items() if stream is not None}
    pct = int(getattr(margs, "validation_split_percentage", 5) or 0)
    if streams["validation"] is not None or pct <= 0:
        if streams[split] is None:
            raise no_validation_error()
        stream = streams[split]
        return DocumentSource(_values(stream, cols[split]), name=name, length=_metadata_length(stream))
    train = streams["train"]
    total = _metadata_length(train)
    if total is None and not local:
        raise UserFacingError(
            f"--streaming: {name} has no validation split and no document count in its metadata, so the "
            f"--validation_split_percentage {pct} hold-out cannot be cut while streaming; pass "
            "--validation_split_percentage 0 (example ids then differ from a run with the hold-out) or drop "
            "--streaming"
        )

    source = DocumentSource(_values(train, cols["train"]), name=name)
    if total is not None:
        source.start, source.stop, source.length = _holdout_range(total, pct, split)
    else:  # a local source: counted on the first read (one more read of it, no tokenization, flat memory)
        source.resolve = lambda: _holdout_range(_count_documents(train, name, pct), pct, split)
    return source


def _holdout_range(n: int, pct: int, split: str) -> tuple[int, int | None, int]:
    """``(start, stop, length)`` of ``split`` among ``n`` documents under the run_clm.py hold-out (the
    rule of loading._split: the first ``pct`` percent is the validation split)."""
    n_val = n * pct // 100
    if n_val == 0 or n_val == n:  # too few documents to split: everything is train, no validation
        if split == "validation":
            raise no_validation_error()
        return 0, None, n
    return (n_val, None, n - n_val) if split == "train" else (0, n_val, n_val)


def _count_documents(stream: Any, name: str, pct: int) -> int:
    logger.info(
        "--streaming: counting the documents of %s for the --validation_split_percentage %d hold-out",
        name,
        pct,
    )
    return sum(len(next(iter(batch.values()))) for batch in stream.iter(batch_size=CHUNK_DOCUMENTS))


def _values(stream: Any, col: str) -> Callable[[], Iterator[Any]]:
    def values() -> Iterator[Any]:
        for batch in stream.select_columns([col]).iter(batch_size=CHUNK_DOCUMENTS):
            yield from batch[col]

    return values


def _metadata_length(stream: Any) -> int | None:
    """The split's number of documents from the dataset's metadata (Hub dataset cards), if it has one."""
    splits = getattr(getattr(stream, "info", None), "splits", None) or {}
    split = getattr(stream, "split", None)
    info = splits.get(str(split)) if split is not None else None
    count = getattr(info, "num_examples", None)
    return int(count) if count else None


def _open_streams(margs: Any) -> tuple[dict[str, Any], str, bool]:
    """``({"train": IterableDataset, "validation": IterableDataset | None}, name, is_local)``."""
    if getattr(margs, "dataset_name", None):
        streams, name = _hub_streams(margs), f"--dataset_name {margs.dataset_name!r}"
        local = os.path.isdir(margs.dataset_name)
    else:
        streams, name, local = _file_streams(margs), f"--train_file {margs.train_file!r}", True
    return {k: _with_features(v, name) if v is not None else None for k, v in streams.items()}, name, local


def _hub_streams(margs: Any) -> dict[str, Any]:
    from datasets import load_dataset

    from hf_gradext.hub import check_dataset_source, dataset_error

    name = margs.dataset_name
    check_dataset_source(name)
    try:
        ds = load_dataset(
            name,
            getattr(margs, "dataset_config_name", None),
            cache_dir=getattr(margs, "cache_dir", None),
            streaming=True,
        )
    except Exception as exc:  # datasets raises many unrelated types
        raise dataset_error(name, exc) from exc
    if "train" not in ds:
        raise UserFacingError(
            f"--dataset_name {name!r} has no 'train' split (splits: {', '.join(ds)}); pick a dataset/config with one"
        )
    return {"train": ds["train"], "validation": ds.get("validation")}


def _file_streams(margs: Any) -> dict[str, Any]:
    """Local files as loading._load_files reads them (same checks, same builder options), streamed."""
    from datasets import load_dataset

    from hf_gradext.data.loading import _require_text_column, checked_data_files

    files, builder = checked_data_files(margs)
    kwargs: dict[str, Any] = (
        {"keep_linebreaks": getattr(margs, "keep_linebreaks", True)} if builder == "text" else {}
    )
    # Same documents (each read ends at a line end), a tenth of the transient: see STREAM_READ_BYTES.
    kwargs.update(read_chunk_options(builder, STREAM_READ_BYTES))
    try:
        ds = load_dataset(
            builder, data_files=files, cache_dir=getattr(margs, "cache_dir", None), streaming=True, **kwargs
        )
        streams = {
            split: _with_features(ds[split], f"--{split}_file {path!r}") for split, path in files.items()
        }
    except UserFacingError:
        raise
    except Exception as exc:
        raise _read_error(margs.train_file, builder, exc) from exc
    if builder != "text" and not getattr(margs, "text_column", None):
        for split, path in files.items():
            _require_text_column(streams[split], path, f"--{split}_file")
    return {"train": streams["train"], "validation": streams.get("validation")}


def _with_features(stream: Any, name: str) -> Any:
    """The stream with its columns known (a text/json stream learns them from its first row)."""
    try:
        return resolve_features(stream)  # reads the first row only
    except StopIteration:
        raise UserFacingError(f"{name} has no documents; pass data with some text in it") from None


def _read_error(path: str, builder: str, exc: BaseException) -> UserFacingError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return UserFacingError(
        f"--train_file {path!r} could not be read as {builder} ({type(exc).__name__}: {first}); fix the file format"
    )
