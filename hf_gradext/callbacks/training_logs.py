"""Putting extension metrics into the training logs without taking anything out of them.

Two tempting ways are both wrong with transformers' ``Trainer``:

* ``TrainerCallback.on_log`` receives the logs dict, but ``Trainer.log`` appends the entry to
  ``state.log_history`` *before* it calls ``on_log``, and the ``report_to`` integrations (callbacks
  registered before ours) have already sent it by then: keys added there reach neither.
* ``trainer.log(extra)`` from ``on_step_end`` writes an entry of its own, but every log call ends in
  ``CallbackHandler.on_log``, which sets ``control.should_log = False``: HF's own entry of that step
  (``loss``, ``grad_norm``, ``learning_rate``, throughput, ``gqc/*``) is then never written, and its loss is
  averaged into the next logged step.

So extensions (1) add their keys to HF's own training entry by wrapping the trainer's ``log`` -- the
method HF documents as the one to override -- which runs before the entry is stored or reported, and
(2) when HF does not log the step at all, write an entry of their own with
:func:`log_own_entry`, which leaves ``control.should_log`` as it found it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def is_training_log(logs: dict[str, Any]) -> bool:
    """Whether ``logs`` is HF's periodic training entry (not an evaluation or the end-of-training summary)."""
    return "loss" in logs and not any(str(k).startswith("eval_") for k in logs)


def extend_training_logs(trainer: Any, extra: Callable[[], dict[str, float]]) -> None:
    """Merge ``extra()`` into every training entry ``trainer.log`` writes, before it is stored or reported.

    ``extra`` is called once per training entry; keys it returns overwrite nothing HF set (it should use
    its own prefix).
    """
    original_log = trainer.log

    def log(logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if is_training_log(logs):
            for key, value in extra().items():
                logs.setdefault(key, value)
        return original_log(logs, *args, **kwargs)

    trainer.log = log


def log_own_entry(trainer: Any, control: Any, logs: dict[str, float]) -> None:
    """``trainer.log(logs)`` as an entry of its own, without cancelling HF's pending log of this step."""
    before = control.should_log
    trainer.log(logs)
    # CallbackHandler.on_log cleared it (on trainer.control, normally the very object passed to us).
    control.should_log = before
    trainer.control.should_log = before
