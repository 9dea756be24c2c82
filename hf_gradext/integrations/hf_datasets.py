"""``datasets`` internals the streaming reader relies on, each checked once.

* ``packaged_modules.text.text.TextConfig`` / ``packaged_modules.json.json.JsonConfig`` have a
  ``chunksize`` field: the bytes the builder reads from a file per step (documented as a builder option,
  but its presence is checked here since the config classes are not part of datasets' top-level API);
* ``IterableDataset._resolve_features()``: reads the first row of a stream whose columns are not yet
  known (json / text streams) and returns the stream with its features set.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hf_gradext.integrations.guard import check_once

PACKAGE = "datasets"
_CONFIGS = {
    "text": ("datasets.packaged_modules.text.text", "TextConfig"),
    "json": ("datasets.packaged_modules.json.json", "JsonConfig"),
}


def read_chunk_options(builder: str, nbytes: int) -> dict[str, Any]:
    """Builder options that make the ``text`` / ``json`` builder read ``nbytes`` per step; ``{}`` for others.

    Raises:
        IntegrationError: the builder's config no longer has a ``chunksize`` field.
    """
    if builder not in _CONFIGS:
        return {}
    module_name, class_name = _CONFIGS[builder]

    def check() -> str | None:
        import importlib

        config = getattr(importlib.import_module(module_name), class_name)
        if "chunksize" not in {f.name for f in dataclasses.fields(config)}:
            return f"{class_name} has no chunksize field"
        return None

    check_once(f"{class_name}.chunksize", PACKAGE, check)
    return {"chunksize": int(nbytes)}


def resolve_features(stream: Any) -> Any:
    """``stream`` with its columns known; reads its first row when they are not (StopIteration if empty).

    Raises:
        IntegrationError: ``IterableDataset._resolve_features`` is gone.
    """
    if stream.features is not None:
        return stream

    def check() -> str | None:
        from datasets import IterableDataset

        if not callable(getattr(IterableDataset, "_resolve_features", None)):
            return "IterableDataset._resolve_features does not exist"
        return None

    check_once("IterableDataset._resolve_features", PACKAGE, check)
    return stream._resolve_features()
