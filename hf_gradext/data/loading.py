"""Raw text datasets: a Hub dataset, local text/json/jsonl/csv files, or the embedded default corpus.

Mirrors transformers' ``run_clm.py``: when there is no validation split, the first
``validation_split_percentage`` percent of the training split becomes the validation set.
Every failure a user can cause raises :class:`~hf_gradext.errors.UserFacingError` with the flag name.
"""

from __future__ import annotations

import os
from typing import Any

from hf_gradext.errors import UserFacingError
from hf_gradext.hub import check_dataset_source, dataset_error

# File extension -> `datasets` builder name.
FILE_BUILDERS = {"txt": "text", "text": "text", "json": "json", "jsonl": "json", "csv": "csv"}


def file_builder(path: str, flag: str) -> str:
    """The ``datasets`` builder for a local data file, or a UserFacingError naming ``flag``."""
    ext = path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""
    if ext not in FILE_BUILDERS:
        raise UserFacingError(
            f"{flag} {path!r}: unsupported file type {('.' + ext) if ext else '(no extension)'}; "
            f"use one of {', '.join('.' + e for e in FILE_BUILDERS)}"
        )
    return FILE_BUILDERS[ext]


def is_embedded(args: Any) -> bool:
    """True when the run uses the embedded corpus (no ``--dataset_name`` and no ``--train_file``)."""
    return not getattr(args, "dataset_name", None) and not getattr(args, "train_file", None)


def load_raw_datasets(args: Any) -> dict[str, Any]:
    """Load the raw (untokenized) splits as ``{"train": Dataset, "validation": Dataset | None}``."""
    from datasets import Dataset

    pct = int(getattr(args, "validation_split_percentage", 5) or 0)
    if is_embedded(args):
        from hf_gradext.data.corpus import embedded_documents

        raw = Dataset.from_dict({"text": list(embedded_documents())})
        return _split(raw, pct)
    if getattr(args, "dataset_name", None):
        return _load_hub(args, pct)
    return _load_files(args, pct)


def _split(train: Any, pct: int, validation: Any = None) -> dict[str, Any]:
    """Hold out the first ``pct`` percent of ``train`` when there is no validation split (run_clm.py)."""
    if validation is not None or pct <= 0:
        return {"train": train, "validation": validation}
    n_val = len(train) * pct // 100
    if n_val == 0 or n_val == len(train):
        # Too few documents to split: evaluate on nothing rather than train on nothing.
        return {"train": train, "validation": None}
    return {"train": train.select(range(n_val, len(train))), "validation": train.select(range(n_val))}


def _load_hub(args: Any, pct: int) -> dict[str, Any]:
    from datasets import load_dataset

    name, config = args.dataset_name, getattr(args, "dataset_config_name", None)
    check_dataset_source(name)  # a missing local folder, or the Hub unreachable: fail before retrying
    try:
        ds = load_dataset(name, config, cache_dir=getattr(args, "cache_dir", None))
    except Exception as exc:  # datasets raises many unrelated types (ConnectionError, FileNotFoundError, ...)
        raise dataset_error(name, exc) from exc
    if "train" not in ds:
        raise UserFacingError(
            f"--dataset_name {name!r} has no 'train' split (splits: {', '.join(ds)}); pick a dataset/config with one"
        )
    return _split(ds["train"], pct, ds.get("validation"))


def checked_data_files(args: Any) -> tuple[dict[str, str], str]:
    """``({split: path}, datasets builder)`` of ``--train_file`` / ``--validation_file``, checked first.

    One format for both, each file existing and non-empty: one-line errors naming the flag. Shared by the
    in-memory and the streaming readers (:mod:`hf_gradext.data.streaming`).
    """
    files = {"train": args.train_file}
    if getattr(args, "validation_file", None):
        files["validation"] = args.validation_file
    builders = {file_builder(path, f"--{split}_file") for split, path in files.items()}
    if len(builders) > 1:
        raise UserFacingError(
            "--train_file and --validation_file have different formats; use the same file type for both"
        )
    for split, path in files.items():
        flag = f"--{split}_file"
        if not os.path.isfile(path):
            raise UserFacingError(
                f"{flag} {path!r} does not exist; pass an existing .txt/.json/.jsonl/.csv file"
            )
        if os.path.getsize(path) == 0:
            raise UserFacingError(f"{flag} {path!r} is empty; pass a file with some text in it")
    return files, builders.pop()


def _load_files(args: Any, pct: int) -> dict[str, Any]:
    from datasets import load_dataset

    files, builder = checked_data_files(args)
    kwargs: dict[str, Any] = {}
    if builder == "text":
        kwargs["keep_linebreaks"] = getattr(args, "keep_linebreaks", True)
    try:
        ds = load_dataset(builder, data_files=files, cache_dir=getattr(args, "cache_dir", None), **kwargs)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserFacingError(
            f"--train_file {args.train_file!r} could not be read as {builder} ({type(exc).__name__}: {first}); "
            f"fix the file format"
        ) from exc
    if builder != "text" and not getattr(args, "text_column", None):
        for split, path in files.items():
            _require_text_column(ds[split], path, "--train_file" if split == "train" else "--validation_file")
    return _split(ds["train"], pct, ds.get("validation"))


def _require_text_column(dataset: Any, path: str, flag: str) -> None:
    """A JSON/CSV file names its columns: without a ``text`` one, guessing (run_clm.py's first column) would
    train on whatever comes first -- ids, labels, numbers cast to strings. Ask instead."""
    columns = list(dataset.column_names)
    if "text" not in columns:
        raise UserFacingError(
            f"{flag} {path!r} has no 'text' column (columns: {', '.join(columns) or 'none'}); "
            "pass --text_column NAME to choose the one holding the text"
        )
