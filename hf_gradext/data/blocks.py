"""Tokenize raw text and group it into fixed-length blocks, as transformers' ``run_clm.py`` does.

Differences from ``run_clm.py``, each on purpose:

* an eos token is appended to every document before concatenation, so blocks that span two
  documents carry a document boundary (GPT-2's tokenizer does not add one itself);
* every block gets an ``example_id`` column: its index in the grouped dataset. It is stable for a
  given data source, tokenizer, block size and sample cap, which is what per-sample gradient
  stores and data attribution use to name a training example;
* no ``attention_mask`` column: blocks are cut from one concatenated stream and never padded, so the
  mask would be all ones. GPT-2 without a mask is exactly the causal, no-padding case, and passing an
  all-ones mask costs a host-device sync per forward with sdpa (see ``docs/patches.md``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import chain, islice
from typing import Any

from hf_gradext.errors import UserFacingError

EXAMPLE_ID_COLUMN = "example_id"
# Documents per grouping run (``Dataset.map``'s batch in :func:`tokenize_and_group`): a block never spans
# two runs and each run's remainder is dropped, so this number is part of what an example id names.
CHUNK_DOCUMENTS = 1000


def text_column(dataset: Any, requested: str | None = None) -> str:
    """The text column: ``requested`` if given, else ``"text"``, else the first column (run_clm.py).

    The column must hold strings: tokenizing ``str(value)`` of numbers or lists would train silently on
    text that is not the data.
    """
    columns = list(dataset.column_names)
    if requested is not None:
        if requested not in columns:
            raise UserFacingError(
                f"--text_column {requested!r} is not a column of the dataset (columns: {', '.join(columns)}); "
                f"pick one of those"
            )
        col = requested
    elif not columns:
        raise UserFacingError("the dataset has no columns; pass data with a text column")
    else:
        col = "text" if "text" in columns else columns[0]
    kind = _feature_kind(dataset, col)
    if kind is not None and kind not in ("string", "large_string"):
        raise UserFacingError(
            f"column {col!r} holds {kind} values, not text (columns: {', '.join(columns)}); "
            "pass --text_column NAME to choose the column holding the text"
        )
    return col


def _feature_kind(dataset: Any, column: str) -> str | None:
    """The dtype name of a ``datasets`` column (``"string"``, ``"int64"``, ``"list"``...), None if unknown."""
    feature = (getattr(dataset, "features", None) or {}).get(column)
    if feature is None:
        return None
    return str(getattr(feature, "dtype", None) or type(feature).__name__)


def group_texts(examples: dict[str, list[list[int]]], block_size: int) -> dict[str, list[list[int]]]:
    """Concatenate token lists and cut them into ``block_size`` chunks; the remainder is dropped.

    ``labels`` are a copy of ``input_ids`` (the model shifts them). Every list-valued token column
    given (``input_ids``, and ``attention_mask`` etc. if present) is grouped.
    """
    concatenated = {k: list(chain.from_iterable(v)) for k, v in examples.items()}
    total = (len(concatenated["input_ids"]) // block_size) * block_size
    result = {
        k: [t[i : i + block_size] for i in range(0, total, block_size)] for k, t in concatenated.items()
    }
    result["labels"] = [list(x) for x in result["input_ids"]]
    return result


def tokenize_documents(texts: Sequence[Any], tokenizer: Any) -> list[list[int]]:
    """Token ids of each document: no special tokens, eos appended (None counts as empty text)."""
    texts = ["" if t is None else str(t) for t in texts]
    # Documents are far longer than model_max_length before grouping; that is fine here.
    out = tokenizer(texts, add_special_tokens=False, verbose=False, return_attention_mask=False)
    eos = tokenizer.eos_token_id
    if eos is None:
        return out["input_ids"]
    return [ids + [eos] for ids in out["input_ids"]]


def iter_block_chunks(
    documents: Iterable[Any], tokenizer: Any, block_size: int
) -> Iterator[dict[str, list[list[int]]]]:
    """The blocks of each run of :data:`CHUNK_DOCUMENTS` documents, tokenized only when asked for.

    Chunk ``k`` holds exactly the blocks that :func:`tokenize_and_group` (without ``num_proc``) cuts from
    documents ``1000k .. 1000k + 999``, in order; nothing past the chunk a caller stops at is read.
    """
    it = iter(documents)
    while texts := list(islice(it, CHUNK_DOCUMENTS)):
        yield group_texts({"input_ids": tokenize_documents(texts, tokenizer)}, block_size)


def tokenize_and_group(
    dataset: Any,
    tokenizer: Any,
    block_size: int,
    *,
    column: str | None = None,
    num_proc: int | None = None,
    max_samples: int | None = None,
    split_name: str = "train",
    load_from_cache_file: bool = True,
) -> Any:
    """Tokenize ``dataset``'s text column, append eos per document, group into blocks, add ``example_id``.

    Args:
        dataset: a ``datasets.Dataset`` with a text column.
        tokenizer: a fast HF tokenizer.
        block_size: tokens per block (>= 1).
        column: the text column (default: see :func:`text_column`).
        num_proc: worker processes for ``Dataset.map``.
        max_samples: keep only the first ``max_samples`` blocks (applied after grouping, as run_clm.py).
        split_name: used in error messages.
        load_from_cache_file: reuse ``datasets``' cache of earlier runs.

    Returns:
        A ``Dataset`` with ``input_ids``, ``labels`` (both ``block_size`` long) and ``example_id``
        (0..N-1); no ``attention_mask`` (see the module doc).
    """
    if block_size < 1:
        raise UserFacingError(f"--block_size {block_size} must be >= 1")
    col = text_column(dataset, column)

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        return {"input_ids": tokenize_documents(batch[col], tokenizer)}

    common = {"num_proc": num_proc, "load_from_cache_file": load_from_cache_file}
    tokenized = dataset.map(
        tokenize, batched=True, remove_columns=dataset.column_names, desc=f"tokenizing {split_name}", **common
    )
    n_tokens = sum(len(x) for x in tokenized["input_ids"])
    blocks = tokenized.map(
        group_texts,
        batched=True,
        batch_size=CHUNK_DOCUMENTS,
        fn_kwargs={"block_size": block_size},
        desc=f"grouping {split_name} into blocks of {block_size}",
        **common,
    )
    if len(blocks) == 0:
        raise UserFacingError(
            f"the {split_name} set has {n_tokens} tokens, fewer than one block of --block_size {block_size}; "
            f"use a smaller --block_size or more data"
        )
    if max_samples is not None:
        blocks = blocks.select(range(min(max_samples, len(blocks))))
    return blocks.add_column(EXAMPLE_ID_COLUMN, list(range(len(blocks))))
