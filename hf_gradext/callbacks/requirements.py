"""What the collection and projection callbacks need from the trainer that drives them.

They work through microbatch observers, which only :class:`~hf_gradext.trainer.GradExtTrainer` calls,
and read hf_gradext's flags from ``trainer.args``. On a plain ``transformers.Trainer`` (or TRL's
``SFTTrainer``) they would otherwise fail with an ``AttributeError`` deep inside, or, worse, silently
collect nothing; this check says so at construction, in one line, with the fix.
"""

from __future__ import annotations

from typing import Any

from hf_gradext.errors import UserFacingError

MIXIN_HINT = (
    "use hf_gradext.GradExtTrainer, or put it first in your trainer's bases "
    "(class MyTrainer(GradExtTrainer, SFTTrainer)), with hf_gradext.GradExtArguments as args"
)


def require_gradext_trainer(trainer: Any, callback: str, flag: str) -> None:
    """Raise unless ``trainer`` calls microbatch observers and its args carry ``flag``.

    Args:
        trainer: the trainer the callback is built for.
        callback: the callback's class name (for the message).
        flag: an hf_gradext flag the callback reads (``gradient_collection_steps``, ...).
    """
    if not callable(getattr(trainer, "add_microbatch_observer", None)):
        raise UserFacingError(
            f"{callback} needs a trainer that runs hf_gradext's microbatch observers, got "
            f"{type(trainer).__name__}; {MIXIN_HINT}"
        )
    if not hasattr(getattr(trainer, "args", None), flag):
        raise UserFacingError(
            f"{callback} reads --{flag}, which {type(getattr(trainer, 'args', None)).__name__} does not have; "
            f"{MIXIN_HINT}"
        )
