"""hf_gradext: a HuggingFace Trainer extension for gradient quality control, per-sample gradients,
Kronecker gradient projection and GPT-2 patches.

``import hf_gradext`` registers patched GPT-2's ``model_type`` (``gpt2_gradext``) with transformers' Auto
classes (:mod:`hf_gradext.patches`; registry entries only). ``GradExtArguments`` / ``GradExtTrainer`` are
imported on first use. The ``hf-gradext`` command defers even the registration when it only prints text
(``hf-gradext``, ``--help``, ``--version``): that needs neither torch nor transformers, so it answers in
a fraction of a second instead of the seconds an import of torch takes.
"""

from __future__ import annotations

import os
import sys
from typing import Any

__version__ = "0.2.0"

_LAZY = {
    "GradExtArguments": "hf_gradext.arguments",
    "GradExtTrainer": "hf_gradext.trainer",
    "GradExtSFTConfig": "hf_gradext.arguments.sft",  # these two import trl (docs/trl.md)
    "GradExtSFTTrainer": "hf_gradext.trainer",
}
_TEXT_ONLY_ARGS = ("-h", "--help", "-V", "--version")


def _cli_prints_text_only(argv: list[str]) -> bool:
    """``hf-gradext`` with no command, ``--help`` or ``--version`` (the console script's own process)."""
    if not argv or os.path.basename(argv[0]) not in ("hf-gradext", "hf-gradext.exe"):
        return False
    return len(argv) == 1 or argv[1] in _TEXT_ONLY_ARGS


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_gradext' has no attribute {name!r}")


if not _cli_prints_text_only(sys.argv):
    import hf_gradext.patches  # noqa: F401  (registers model_type gpt2_gradext with the Auto classes)

__all__ = ["GradExtArguments", "GradExtSFTConfig", "GradExtSFTTrainer", "GradExtTrainer", "__version__"]
