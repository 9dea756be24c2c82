"""What hf_gradext assumes of TRL's ``SFTTrainer`` (trl 1.16), checked where it is relied on.

* **Extra dataset columns survive data preparation.** ``SFTTrainer._prepare_dataset`` adds columns with
  ``Dataset.map`` (EOS, ``input_ids``, ``labels``) and keeps the others, so an ``example_id`` column added
  to the user's dataset reaches the prepared one. Packing is the exception (it keeps ``input_ids`` and
  ``labels`` only, and mixes examples per row): hf_gradext refuses it with per-sample consumers
  (:func:`hf_gradext.arguments.sft.refuse_packed_rows`). Checked on the prepared dataset itself
  (:func:`check_example_ids_kept`): a drift raises instead of writing id -1 rows.
* **TRL's collator drops unknown keys.** ``DataCollatorForLanguageModeling`` returns ``input_ids``,
  ``labels``, ``attention_mask`` (and position ids) only. :class:`ExampleIdCollator` takes ``example_id``
  out of the features, lets the inner collator do the rest, and puts the ids back as a ``(B,)`` tensor;
  it works the same on any collator, so there is nothing to check.
* **The fused LM head.** ``SFTTrainer`` replaces the model's ``forward`` (``trl.trainer.utils.add_fused_lm_head``)
  and trains through ``model(..., fused_lm_head=True)``, which multiplies the hidden states by
  ``lm_head.weight`` inside a custom autograd function: the ``lm_head`` module is never called, so its
  capture hooks never fire, and a per-sample gradient of ``lm_head`` (or of a token embedding tied to
  it) would silently miss the head's part. :func:`lm_head_bypassed` tells whether a model's forward is
  such a fused one (checked once: ``SFTTrainer.compute_loss`` still asks for ``fused_lm_head``), and
  :func:`bypassed_modules` names the selected modules that own a parameter of the output embedding.

Nothing here imports trl at module level; the callers only reach it once trl is imported.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from types import CodeType
from typing import Any

import torch
from torch import nn

from hf_gradext.integrations import accelerate as accelerate_integration
from hf_gradext.integrations import peft as peft_integration
from hf_gradext.integrations.guard import check_once, drift_error

PACKAGE = "trl"
FUSED_LM_HEAD = "SFTTrainer.compute_loss(fused_lm_head)"
PREPARED_COLUMNS = "SFTTrainer._prepare_dataset"
FUSED_KEYWORD = "fused_lm_head"
EXAMPLE_ID = "example_id"


# ------------------------------------------------------------------------------------------ example ids
def column_names(dataset: Any) -> list[str] | None:
    """A ``datasets`` (Iterable)Dataset's columns; ``None`` when an iterable dataset does not know them."""
    names = getattr(dataset, "column_names", None)
    return list(names) if names is not None else None


def _has_column(dataset: Any, column: str) -> bool:
    names = column_names(dataset)
    if names is None:  # an IterableDataset without known features: look at its first example (TRL does too)
        first = next(iter(dataset), None)
        return isinstance(first, Mapping) and column in first
    return column in names


def with_example_ids(dataset: Any) -> Any:
    """``dataset`` with an ``example_id`` column (the row index in ``dataset``), unless it has one.

    Done *before* TRL prepares the data, so the id is the row of the dataset the user passed, and rows
    TRL drops later (fully masked after truncation) leave gaps instead of renumbering the others.
    """
    from datasets import Dataset, IterableDataset

    if dataset is None or _has_column(dataset, EXAMPLE_ID):
        return dataset
    if isinstance(dataset, Dataset):
        return dataset.add_column(EXAMPLE_ID, list(range(len(dataset))))
    if isinstance(dataset, IterableDataset):
        return dataset.map(lambda _example, index: {EXAMPLE_ID: index}, with_indices=True)
    return dataset  # SFTTrainer itself refuses anything else, with its own message


def check_example_ids_kept(prepared: Any) -> None:
    """Raise unless TRL's prepared train dataset still carries the ``example_id`` column we added."""
    if not _has_column(prepared, EXAMPLE_ID):
        raise drift_error(
            PREPARED_COLUMNS,
            PACKAGE,
            "the prepared train dataset lost the example_id column (TRL's preparation no longer keeps extra columns)",
        )


class ExampleIdCollator:
    """Collates with ``inner`` and keeps ``example_id`` (TRL's collators drop keys they do not know).

    Args:
        inner: the collator ``SFTTrainer`` chose (or the user passed).
    """

    def __init__(self, inner: Callable[[list[Any]], Any]) -> None:
        self.inner = inner

    def __call__(self, features: list[Any]) -> Any:
        if not features or not all(isinstance(f, Mapping) and EXAMPLE_ID in f for f in features):
            return self.inner(features)
        ids = [f[EXAMPLE_ID] for f in features]
        batch = self.inner([{k: v for k, v in f.items() if k != EXAMPLE_ID} for f in features])
        batch[EXAMPLE_ID] = _as_id_tensor(ids)
        return batch


def _as_id_tensor(ids: Sequence[Any]) -> Any:
    """Integer ids as a ``(B,)`` int64 tensor (what HF's default collator makes of them); others as given."""
    try:
        return torch.tensor([int(i) for i in ids], dtype=torch.long)
    except (TypeError, ValueError):
        return list(ids)


# ------------------------------------------------------------------------------------------ fused LM head
def _code_strings(code: CodeType) -> set[str]:
    """Names and string constants a function's code (and its nested code) uses: keyword names included."""
    out = set(code.co_names) | set(code.co_varnames)
    for const in code.co_consts:
        if isinstance(const, str):
            out.add(const)
        elif isinstance(const, tuple):
            out |= {c for c in const if isinstance(c, str)}
        elif isinstance(const, CodeType):
            out |= _code_strings(const)
    return out


def _check_fused_lm_head() -> str | None:
    from trl import SFTTrainer

    code = getattr(getattr(SFTTrainer, "compute_loss", None), "__code__", None)
    if code is None:
        return "SFTTrainer.compute_loss does not exist"
    if FUSED_KEYWORD not in _code_strings(code):
        return f"SFTTrainer.compute_loss no longer calls the model with {FUSED_KEYWORD}=True"
    return None


def _output_model(model: nn.Module) -> Any:
    """The transformers model TRL fuses the head of (DDP / compile / peft wrappers looked through)."""
    return peft_integration.base_model(accelerate_integration.unwrap_model(model))


def lm_head_bypassed(model: nn.Module) -> bool:
    """Whether ``model`` trains through TRL's fused LM head (the ``lm_head`` module is then never called).

    Raises:
        IntegrationError: ``SFTTrainer.compute_loss`` no longer asks for the fused head by that keyword,
            so a fused forward could no longer be recognized.
    """
    check_once(FUSED_LM_HEAD, PACKAGE, _check_fused_lm_head)
    forward = getattr(_output_model(model), "forward", None)
    try:
        # follow_wrapped=False: TRL's forward carries functools.wraps of the original (without the keyword).
        params = inspect.signature(forward, follow_wrapped=False).parameters
    except (TypeError, ValueError):
        return False
    return FUSED_KEYWORD in params


def bypassed_modules(model: nn.Module, modules: Mapping[str, nn.Module]) -> list[str]:
    """Names in ``modules`` that own a parameter of the output embedding (``lm_head``, a tied ``wte``)."""
    head = getattr(_output_model(model), "get_output_embeddings", lambda: None)()
    if head is None:
        return []
    head_params = {id(p) for p in head.parameters()}
    return [
        name
        for name, module in modules.items()
        if any(id(p) in head_params for p in module.parameters(recurse=False))
    ]


def check_all() -> None:
    """Every static check of this module (imports trl)."""
    import trl  # noqa: F401

    check_once(FUSED_LM_HEAD, PACKAGE, _check_fused_lm_head)
