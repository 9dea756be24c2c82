"""The private ``transformers.Trainer`` internals hf_gradext relies on, each checked before first use.

Two kinds of touchpoint:

* **Hooks GradExtTrainer overrides** (``_run_epoch``, ``set_initial_training_values``,
  ``_init_training_state``, ``_save_checkpoint``). Overriding a method transformers no longer calls
  fails *silently*: a ``--gqc`` run would train with HF's fixed accumulation of 1 and still log.
  :func:`check_trainer_hooks` runs at GradExtTrainer construction (GQC on) and checks, per hook, that
  it exists with exactly the parameters our override takes (``inspect.signature``) and that HF's caller
  still calls it: the hook's name is among the attribute names the caller's code object loads
  (``co_names``). That is a cheap, static look at the caller's bytecode; it cannot prove the call is
  reached, so the GQC loop also verifies at run time that it really ran (see
  :func:`hf_gradext.gqc.loop.run_gqc_epoch` and ``GradExtTrainer.training_step``). Where our override
  *returns* what HF's caller unpacks (``set_initial_training_values``: 7 values, ``_init_training_state``:
  2), the check reads the caller's ``UNPACK_SEQUENCE`` targets: the same count and the same variable
  names in the same order, so a reordered tuple is caught as well as a longer one.
* **Private methods and attributes the package calls** (``_clip_grad_norm``, ``_tr_loss`` ...): each has
  a thin function here that checks the touchpoint once (:func:`~hf_gradext.integrations.guard.check_once`)
  and then calls it. Signatures are checked as *call shapes*: the names we pass must be the first
  parameters, in order, and any further parameter must have a default (an added optional parameter is
  no drift; a renamed, reordered or newly required one is).

Every failure raises :class:`~hf_gradext.integrations.guard.IntegrationError` naming the touchpoint, the
installed transformers and the supported range; nothing falls back to a different behaviour.
"""

from __future__ import annotations

import dis
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from hf_gradext.integrations.guard import check_once, drift_error

PACKAGE = "transformers"

# What HF's _inner_training_loop passes to _run_epoch (by keyword); run_gqc_epoch takes exactly these.
RUN_EPOCH_PARAMETERS: tuple[str, ...] = (
    "model",
    "epoch",
    "train_dataloader",
    "steps_in_epoch",
    "num_update_steps_per_epoch",
    "trial",
    "ignore_keys_for_eval",
    "start_time",
    "resume_from_checkpoint",
    "epochs_trained",
    "steps_trained_in_current_epoch",
)
INITIAL_TRAINING_VALUES_PARAMETERS: tuple[str, ...] = ("args", "dataloader")
# The 7-tuple set_initial_training_values returns, as the caller's variables (the GQC override
# returns its values in this order).
INITIAL_TRAINING_VALUES: tuple[str, ...] = (
    "num_train_epochs",
    "num_update_steps_per_epoch",
    "num_examples",
    "num_train_samples",
    "total_train_batch_size",
    "steps_in_epoch",
    "max_steps",
)
INIT_TRAINING_STATE_PARAMETERS: tuple[str, ...] = (
    "max_steps",
    "num_update_steps_per_epoch",
    "num_train_epochs",
    "resume_from_checkpoint",
    "trial",
)
INIT_TRAINING_STATE_VALUES: tuple[str, ...] = ("epochs_trained", "steps_trained_in_current_epoch")
SAVE_CHECKPOINT_PARAMETERS: tuple[str, ...] = ("model", "trial")
MAYBE_LOG_SAVE_EVALUATE_PARAMETERS: tuple[str, ...] = (
    "tr_loss",
    "grad_norm",
    "model",
    "trial",
    "epoch",
    "ignore_keys_for_eval",
    "start_time",
    "learning_rate",
)


def _trainer_cls() -> type:
    from transformers import Trainer

    return Trainer


# ---------------------------------------------------------------------------------------------- helpers
def _code(func: Any) -> Any:
    """The code object of a (possibly decorated) function, or None."""
    return getattr(inspect.unwrap(func), "__code__", None) if func is not None else None


def calls_problem(caller_name: str, callee: str, owner: Any = None) -> str | None:
    """None when ``owner.caller_name``'s code loads the attribute ``callee``, else why not.

    ``co_names`` lists every global and attribute name a function's bytecode loads, so
    ``self._run_epoch(...)`` in ``_inner_training_loop`` puts ``_run_epoch`` there.
    """
    owner = owner if owner is not None else _trainer_cls()
    func = getattr(owner, caller_name, None)
    if func is None:
        return f"Trainer.{caller_name} (its caller) does not exist"
    code = _code(func)
    if code is None:
        return f"Trainer.{caller_name} (its caller) cannot be inspected"
    if callee not in code.co_names:
        return f"Trainer.{caller_name} no longer calls {callee}"
    return None


def unpack_targets(caller: Callable[..., Any], callee: str) -> tuple[str, ...] | None:
    """The variables ``caller`` unpacks the result of ``self.<callee>(...)`` into, or None.

    Reads the bytecode: the first ``UNPACK_SEQUENCE`` after the attribute load of ``callee`` and the
    stores that follow it (``STORE_FAST_STORE_FAST``, Python 3.13+, stores two names at once).
    """
    code = _code(caller)
    if code is None:
        return None
    instructions = list(dis.get_instructions(code))
    start = next(
        (
            i
            for i, ins in enumerate(instructions)
            if ins.opname in ("LOAD_ATTR", "LOAD_METHOD") and ins.argval == callee
        ),
        None,
    )
    if start is None:
        return None
    for i in range(start, len(instructions)):
        if instructions[i].opname != "UNPACK_SEQUENCE":
            continue
        count = int(instructions[i].arg)
        names: list[str] = []
        for ins in instructions[i + 1 :]:
            if len(names) >= count or not ins.opname.startswith("STORE_"):
                break
            value = ins.argval
            if isinstance(value, tuple):
                names.extend(str(v) for v in value)
            elif ins.opname == "STORE_FAST_STORE_FAST" and isinstance(value, str):
                names.extend(part.strip() for part in value.split(","))
            else:
                names.append(str(value))
        return tuple(names) if len(names) == count else None
    return None


def exact_parameters_problem(func: Any, expected: Iterable[str]) -> str | None:
    """None when ``func`` takes exactly ``expected`` (``self`` aside), in that order."""
    if func is None:
        return "it does not exist"
    try:
        params = [p.name for p in inspect.signature(func).parameters.values() if p.name != "self"]
    except (TypeError, ValueError):
        return "its signature cannot be read"
    expected = tuple(expected)
    if tuple(params) != expected:
        return f"its parameters are ({', '.join(params)}), expected ({', '.join(expected)})"
    return None


def call_shape_problem(func: Any, passed: Iterable[str]) -> str | None:
    """None when ``func(*passed)`` binds ``passed`` to its first parameters, in order, with the rest optional."""
    if func is None:
        return "it does not exist"
    try:
        params = [p for p in inspect.signature(func).parameters.values() if p.name != "self"]
    except (TypeError, ValueError):
        return "its signature cannot be read"
    passed = tuple(passed)
    names = tuple(p.name for p in params[: len(passed)])
    if names != passed:
        have = ", ".join(p.name for p in params) or "nothing"
        return f"its parameters are ({have}); hf_gradext passes ({', '.join(passed)})"
    for p in params[len(passed) :]:
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            return f"it has a new required parameter {p.name!r}"
    return None


def _first(*problems: Callable[[], str | None]) -> str | None:
    for problem in problems:
        found = problem()
        if found:
            return found
    return None


def _method(name: str) -> Any:
    return getattr(_trainer_cls(), name, None)


# ------------------------------------------------------------------------- hooks GradExtTrainer overrides
def _check_run_epoch() -> str | None:
    return _first(
        lambda: exact_parameters_problem(_method("_run_epoch"), RUN_EPOCH_PARAMETERS),
        lambda: calls_problem("_inner_training_loop", "_run_epoch"),
    )


def _check_unpacked(callee: str, expected: tuple[str, ...]) -> str | None:
    caller = _method("_inner_training_loop")
    got = unpack_targets(caller, callee) if caller is not None else None
    if got != expected:
        shown = f"({', '.join(got)})" if got is not None else "no tuple"
        return (
            f"Trainer._inner_training_loop unpacks {shown} from it, expected the {len(expected)} values "
            f"({', '.join(expected)})"
        )
    return None


def _check_set_initial_training_values() -> str | None:
    return _first(
        lambda: exact_parameters_problem(
            _method("set_initial_training_values"), INITIAL_TRAINING_VALUES_PARAMETERS
        ),
        lambda: calls_problem("_inner_training_loop", "set_initial_training_values"),
        lambda: _check_unpacked("set_initial_training_values", INITIAL_TRAINING_VALUES),
    )


def _check_init_training_state() -> str | None:
    return _first(
        lambda: exact_parameters_problem(_method("_init_training_state"), INIT_TRAINING_STATE_PARAMETERS),
        lambda: calls_problem("_inner_training_loop", "_init_training_state"),
        lambda: _check_unpacked("_init_training_state", INIT_TRAINING_STATE_VALUES),
    )


def _check_save_checkpoint() -> str | None:
    # gqc_state.json goes where _save_checkpoint writes: <_get_output_dir(trial)>/<PREFIX_CHECKPOINT_DIR>-<step>.
    return _first(
        lambda: exact_parameters_problem(_method("_save_checkpoint"), SAVE_CHECKPOINT_PARAMETERS),
        lambda: calls_problem("_maybe_log_save_evaluate", "_save_checkpoint"),
        lambda: calls_problem("_save_checkpoint", "_get_output_dir"),
        lambda: calls_problem("_save_checkpoint", "PREFIX_CHECKPOINT_DIR"),
    )


def _check_metric_schedulers() -> str | None:
    # ReduceLROnPlateau / GreedyLR are stepped by HF's _evaluate with the eval metric, which the GQC loop
    # reaches through _maybe_log_save_evaluate (it does not step them itself).
    return _first(
        lambda: calls_problem("_maybe_log_save_evaluate", "_evaluate"),
        lambda: calls_problem("_evaluate", "ReduceLROnPlateau"),
        lambda: calls_problem("_evaluate", "GreedyLR"),
        lambda: calls_problem("_evaluate", "lr_scheduler"),
    )


HOOK_CHECKS: dict[str, Callable[[], str | None]] = {
    "Trainer._run_epoch": _check_run_epoch,
    "Trainer.set_initial_training_values": _check_set_initial_training_values,
    "Trainer._init_training_state": _check_init_training_state,
    "Trainer._save_checkpoint": _check_save_checkpoint,
}
METRIC_SCHEDULER_TOUCHPOINT = "Trainer._evaluate (metric-driven LR schedulers)"


def check_trainer_hooks(metric_scheduler: bool = False) -> None:
    """Check every hook GradExtTrainer's GQC mode overrides (and, with ``metric_scheduler``, that HF's
    evaluation still steps ReduceLROnPlateau / GreedyLR).

    Raises:
        IntegrationError: a hook is gone, takes other parameters, or HF no longer calls it.
    """
    for touchpoint, check in HOOK_CHECKS.items():
        check_once(touchpoint, PACKAGE, check)
    if metric_scheduler:
        check_once(METRIC_SCHEDULER_TOUCHPOINT, PACKAGE, _check_metric_schedulers)


# -------------------------------------------------------------------- private methods the package calls
def _shape_check(name: str, passed: tuple[str, ...]) -> Callable[[], str | None]:
    return lambda: call_shape_problem(_method(name), passed)


CALL_CHECKS: dict[str, Callable[[], str | None]] = {
    "Trainer._load_rng_state": _shape_check("_load_rng_state", ("checkpoint",)),
    "Trainer._maybe_log_save_evaluate": _shape_check(
        "_maybe_log_save_evaluate", MAYBE_LOG_SAVE_EVALUATE_PARAMETERS
    ),
    "Trainer._clip_grad_norm": _shape_check("_clip_grad_norm", ("model",)),
    "Trainer._track_num_input_tokens": _shape_check("_track_num_input_tokens", ("inputs",)),
    "Trainer._get_learning_rate": _shape_check("_get_learning_rate", ()),
    "Trainer._get_output_dir": _shape_check("_get_output_dir", ("trial",)),
    "Trainer._prepare_inputs": _shape_check("_prepare_inputs", ("inputs",)),
}


def _call_check(name: str) -> None:
    check_once(name, PACKAGE, CALL_CHECKS[name])


def _check_signature_columns_static() -> str | None:
    # example_id survives remove_unused_columns only because both column filters read _signature_columns.
    return _first(
        lambda: call_shape_problem(_method("_set_signature_columns_if_needed"), ()),
        lambda: calls_problem("_remove_unused_columns", "_signature_columns"),
        lambda: calls_problem("_get_collator_with_removed_columns", "_signature_columns"),
    )


def signature_columns(trainer: Any) -> list[str]:
    """The trainer's live ``_signature_columns`` list (filled first): the columns HF keeps in a batch.

    Appending to it keeps a column through ``remove_unused_columns``.
    """
    touchpoint = "Trainer._signature_columns"
    check_once(touchpoint, PACKAGE, STATIC_CHECKS[touchpoint])
    trainer._set_signature_columns_if_needed()
    columns = trainer._signature_columns
    if not isinstance(columns, list):
        raise drift_error(touchpoint, PACKAGE, f"it is a {type(columns).__name__}, not a list")
    return columns


def prepare_inputs(trainer: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """HF's ``_prepare_inputs``: the batch on the training device, as ``training_step`` would see it."""
    _call_check("Trainer._prepare_inputs")
    return trainer._prepare_inputs(inputs)


def load_rng_state(trainer: Any, checkpoint: str | None) -> None:
    """Restore the RNG states a checkpoint saved (HF's resume does this in its own epoch loop)."""
    _call_check("Trainer._load_rng_state")
    trainer._load_rng_state(checkpoint)


def train_loss(trainer: Any) -> torch.Tensor:
    """The on-device running training loss HF's logging drains (``Trainer._tr_loss``)."""
    touchpoint = "Trainer._tr_loss"
    check_once(touchpoint, PACKAGE, STATIC_CHECKS[touchpoint])
    found = getattr(trainer, "_tr_loss", None)
    if not isinstance(found, torch.Tensor):  # a cheap per-call look: set by HF's loop, not at construction
        raise drift_error(
            touchpoint, PACKAGE, f"the trainer's _tr_loss is {type(found).__name__}, not a tensor"
        )
    return found


def accumulate_train_loss(trainer: Any, value: torch.Tensor) -> None:
    """Add a step's loss to HF's running training loss, in place (what HF's logging averages)."""
    loss = train_loss(trainer)
    loss += value.to(loss.dtype)


def maybe_log_save_evaluate(
    trainer: Any,
    grad_norm: float | None,
    model: nn.Module,
    trial: Any,
    epoch: int,
    ignore_keys_for_eval: list[str] | None,
    start_time: float,
    learning_rate: float | None,
) -> None:
    """HF's log / evaluate / checkpoint hook, with HF's own running training loss."""
    _call_check("Trainer._maybe_log_save_evaluate")
    trainer._maybe_log_save_evaluate(
        train_loss(trainer),
        grad_norm,
        model,
        trial,
        epoch,
        ignore_keys_for_eval,
        start_time,
        learning_rate=learning_rate,
    )


def clip_grad_norm(trainer: Any, model: nn.Module) -> torch.Tensor | float:
    """Clip to ``--max_grad_norm`` the way HF does (accelerate, mixed meshes); returns the pre-clip norm."""
    _call_check("Trainer._clip_grad_norm")
    return trainer._clip_grad_norm(model)


def track_num_input_tokens(trainer: Any, inputs: dict[str, Any]) -> None:
    """Count a microbatch's input tokens into ``state.num_input_tokens_seen`` as HF does."""
    _call_check("Trainer._track_num_input_tokens")
    trainer._track_num_input_tokens(inputs)


def get_learning_rate(trainer: Any) -> float:
    """The current learning rate as HF logs it (handles metric-driven schedulers)."""
    _call_check("Trainer._get_learning_rate")
    return trainer._get_learning_rate()


def output_dir(trainer: Any, trial: Any) -> str:
    """The run directory ``_save_checkpoint`` writes checkpoints under (per trial in a search)."""
    _call_check("Trainer._get_output_dir")
    return trainer._get_output_dir(trial=trial)


def model_accepts_loss_kwargs(trainer: Any) -> bool:
    """Whether HF passes ``num_items_in_batch`` into the model's forward (then the loss divides by it)."""
    touchpoint = "Trainer.model_accepts_loss_kwargs"
    check_once(touchpoint, PACKAGE, STATIC_CHECKS[touchpoint])
    found = getattr(trainer, "model_accepts_loss_kwargs", None)
    if not isinstance(found, bool):
        raise drift_error(
            touchpoint,
            PACKAGE,
            f"the trainer's model_accepts_loss_kwargs is {type(found).__name__}, not a bool",
        )
    return found


def set_current_accumulation_steps(trainer: Any, steps: int) -> None:
    """Set the divisor HF's ``training_step`` applies to a loss not already normalized by item count."""
    touchpoint = "Trainer.current_gradient_accumulation_steps"
    check_once(touchpoint, PACKAGE, STATIC_CHECKS[touchpoint])
    trainer.current_gradient_accumulation_steps = steps


# Touchpoints read on an instance: what can be checked without one (the attribute's users in HF's code).
STATIC_CHECKS: dict[str, Callable[[], str | None]] = {
    "Trainer._signature_columns": _check_signature_columns_static,
    # HF's loop creates the tensor; _maybe_log_save_evaluate drains it in place (tr_loss -= tr_loss).
    "Trainer._tr_loss": lambda: calls_problem("_inner_training_loop", "_tr_loss"),
    "Trainer.model_accepts_loss_kwargs": lambda: calls_problem("compute_loss", "model_accepts_loss_kwargs"),
    "Trainer.current_gradient_accumulation_steps": lambda: calls_problem(
        "training_step", "current_gradient_accumulation_steps"
    ),
}


# ------------------------------------------------------------------------------------------ diagnostics
def check_all(metric_scheduler: bool = True) -> None:
    """Every check of this module that needs no trainer instance: hooks, call shapes, attribute users.

    Raises:
        IntegrationError: the first touchpoint that drifted.
    """
    check_trainer_hooks(metric_scheduler=metric_scheduler)
    for name in CALL_CHECKS:
        _call_check(name)
    for name, check in STATIC_CHECKS.items():
        check_once(name, PACKAGE, check)
