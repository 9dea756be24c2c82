"""Architecture patches (Liger-Kernel style), dispatched by ``config.model_type``."""

from __future__ import annotations

from typing import Any


def apply_from_args(args: Any, model: Any) -> Any:
    """Apply the patches the ``GradExtArguments`` flags ask for to a freshly built/loaded model.

    Called by ``hf_gradext.train`` right after the model is loaded or built; returns the model to use.
    (Placeholder until the patches issue lands: returns the model unchanged.)
    """
    return model
