"""Data for ``hf-gradext train``: loading, tokenization into blocks, the embedded corpus and tokenizer.

Public helpers (other modules and issues call these):

* :func:`load_tokenizer` — the run's tokenizer (``--tokenizer_name`` / model's / local BPE);
* :func:`build_datasets` — ``(train, eval)`` block datasets with an ``example_id`` column;
* :func:`embedded_corpus_text` — the embedded default corpus as one string.
"""

from __future__ import annotations

from typing import Any

from hf_gradext.data.blocks import EXAMPLE_ID_COLUMN, group_texts, text_column, tokenize_and_group
from hf_gradext.data.corpus import embedded_corpus_text, embedded_documents
from hf_gradext.data.loading import is_embedded, load_raw_datasets
from hf_gradext.data.tokenizer import build_embedded_tokenizer, load_tokenizer

DEFAULT_MAX_BLOCK_SIZE = 1024


def default_block_size(tokenizer: Any, max_positions: int | None = None) -> int:
    """run_clm.py's default: the tokenizer's ``model_max_length`` capped at 1024 and at the model's positions."""
    size = min(int(getattr(tokenizer, "model_max_length", DEFAULT_MAX_BLOCK_SIZE)), DEFAULT_MAX_BLOCK_SIZE)
    if max_positions is not None:
        size = min(size, int(max_positions))
    return size


def build_datasets(
    args: Any, tokenizer: Any, block_size: int | None = None, raw: dict[str, Any] | None = None
) -> tuple[Any, Any | None]:
    """Load, tokenize and group the run's data into ``(train_blocks, eval_blocks_or_None)``.

    Args:
        args: a ``GradExtArguments`` (or anything with the same model/data attributes).
        tokenizer: the run's tokenizer (see :func:`load_tokenizer`).
        block_size: tokens per block; default ``args.block_size`` else :func:`default_block_size`.
        raw: the splits :func:`load_raw_datasets` returned, when the caller loaded them already (to check
            flags against them before the long tokenization).

    Raises:
        UserFacingError: missing/empty/unreadable data, or fewer tokens than one block.
    """
    if block_size is None:
        block_size = getattr(args, "block_size", None) or default_block_size(tokenizer)
    raw = load_raw_datasets(args) if raw is None else raw
    common = {
        "column": getattr(args, "text_column", None),
        "num_proc": getattr(args, "preprocessing_num_workers", None),
        "load_from_cache_file": not getattr(args, "overwrite_cache", False),
    }
    for split in (raw["train"], raw["validation"]):
        if split is not None:
            text_column(
                split, common["column"]
            )  # a wrong column fails now, not after tokenizing the other split
    train = tokenize_and_group(
        raw["train"], tokenizer, block_size, max_samples=getattr(args, "max_train_samples", None), **common
    )
    eval_blocks = None
    if raw["validation"] is not None:
        eval_blocks = tokenize_and_group(
            raw["validation"],
            tokenizer,
            block_size,
            max_samples=getattr(args, "max_eval_samples", None),
            split_name="validation",
            **common,
        )
    return train, eval_blocks


__all__ = [
    "EXAMPLE_ID_COLUMN",
    "build_datasets",
    "build_embedded_tokenizer",
    "default_block_size",
    "embedded_corpus_text",
    "embedded_documents",
    "group_texts",
    "is_embedded",
    "load_raw_datasets",
    "load_tokenizer",
    "tokenize_and_group",
]
