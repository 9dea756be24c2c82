"""Patch functions by ``config.model_type`` and the dispatcher :func:`apply_gradext`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from hf_gradext.errors import UserFacingError
from hf_gradext.patches.gpt2 import apply_gradext_to_gpt2

PATCH_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "gpt2": apply_gradext_to_gpt2,
    "gpt2_gradext": apply_gradext_to_gpt2,  # already patched GPT-2 (hf_gradext.patches.gpt2_config)
}


def _model_type(model_or_type: nn.Module | str) -> str | None:
    if isinstance(model_or_type, str):
        return model_or_type
    return getattr(getattr(model_or_type, "config", None), "model_type", None)


def apply_gradext(model_or_type: nn.Module | str, **flags: Any) -> nn.Module | None:
    """Apply the patches of ``model_or_type``'s architecture.

    Args:
        model_or_type: a model (patched in place, instance level) or a ``model_type`` string
            (class level, for models built afterwards).
        **flags: the patch function's flags, e.g. ``rms_norm=True, swiglu=True``.

    Returns:
        The model (or ``None`` for a type string). A type without patches and no flag switched on
        is returned unchanged.

    Raises:
        UserFacingError: any flag switched on for a model type that has no patches.
    """
    model_type = _model_type(model_or_type)
    patch = PATCH_FUNCTIONS.get(model_type or "")
    if patch is None:
        requested = sorted(name for name, value in flags.items() if value not in (None, False))
        if requested:
            raise UserFacingError(
                f"patch flags {', '.join(requested)} are not supported for model_type {model_type!r} "
                f"(patches exist for: {', '.join(sorted(PATCH_FUNCTIONS))}); drop the flags or use one of those models"
            )
        return None if isinstance(model_or_type, str) else model_or_type
    if isinstance(model_or_type, str):
        return patch(model=None, **flags)
    return patch(model=model_or_type, **flags)
