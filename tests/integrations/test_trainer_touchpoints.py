"""transformers ``Trainer`` internals (hf_gradext.integrations.trainer): each drift, simulated, is one clear error.

A drift is simulated by monkeypatching the installed ``transformers.Trainer`` (a method deleted, its
parameters changed, its caller no longer calling it or unpacking another tuple); the check must then
raise ``IntegrationError`` whose one-line message starts with the touchpoint and names the installed
transformers version. On the real installed release every check passes.
"""

from __future__ import annotations

import functools
import inspect
import textwrap
from types import SimpleNamespace

import pytest
import torch
from transformers import Trainer

from hf_gradext.integrations import guard
from hf_gradext.integrations import trainer as ti
from tests.integrations.drift import assert_drift

VERSION = guard.installed_version("transformers")


_assert_drift = functools.partial(assert_drift, "transformers")


def _with_params(*names: str, optional: tuple[str, ...] = ()):
    """A stand-in method whose signature is ``(self, *names, *optional=None)``."""

    def method(self, *args, **kwargs):
        return None

    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for n in optional]
    method.__signature__ = inspect.Signature(params)
    return method


_LOOP = """
def _inner_training_loop(self, batch_size=None, args=None, resume_from_checkpoint=None, trial=None,
                         ignore_keys_for_eval=None):
    ({values}) = self.{sizes}(args, None)
    ({state}) = self.{init}(max_steps, 1, 1, resume_from_checkpoint, trial)
    self._tr_loss = 0.0
    self.{epoch}(model=None)
"""


def _fake_loop(
    sizes: str = "set_initial_training_values",
    init: str = "_init_training_state",
    epoch: str = "_run_epoch",
    values: tuple[str, ...] = ti.INITIAL_TRAINING_VALUES,
    state: tuple[str, ...] = ti.INIT_TRAINING_STATE_VALUES,
):
    """A stand-in ``_inner_training_loop``: what a transformers release could do instead of 5.23's."""
    source = _LOOP.format(
        sizes=sizes, init=init, epoch=epoch, values=", ".join(values) + ",", state=", ".join(state) + ","
    )
    namespace: dict = {}
    exec(textwrap.dedent(source), namespace)
    return namespace["_inner_training_loop"]


# --------------------------------------------------------------------------------- the installed release
def test_every_check_passes_on_the_installed_transformers():
    ti.check_all(metric_scheduler=True)


def test_the_fake_loop_passes_when_it_matches_the_real_one(monkeypatch):
    # Guards the drift tests below: the stand-in differs from a passing loop only by what each test changes.
    monkeypatch.setattr(Trainer, "_inner_training_loop", _fake_loop())
    ti.check_trainer_hooks()


def test_unpack_targets_reads_the_real_loop():
    loop = Trainer._inner_training_loop
    assert ti.unpack_targets(loop, "set_initial_training_values") == ti.INITIAL_TRAINING_VALUES
    assert ti.unpack_targets(loop, "_init_training_state") == ti.INIT_TRAINING_STATE_VALUES
    assert ti.unpack_targets(loop, "no_such_method") is None


# ------------------------------------------------------------------------------- hooks GradExtTrainer overrides
def test_run_epoch_deleted(monkeypatch):
    monkeypatch.delattr(Trainer, "_run_epoch")
    _assert_drift(ti.check_trainer_hooks, "Trainer._run_epoch", "does not exist")


def test_run_epoch_gets_a_new_parameter(monkeypatch):
    monkeypatch.setattr(Trainer, "_run_epoch", _with_params(*ti.RUN_EPOCH_PARAMETERS, optional=("extra",)))
    _assert_drift(ti.check_trainer_hooks, "Trainer._run_epoch", "extra")


def test_run_epoch_no_longer_called(monkeypatch):
    monkeypatch.setattr(Trainer, "_inner_training_loop", _fake_loop(epoch="_train_one_epoch"))
    _assert_drift(ti.check_trainer_hooks, "Trainer._run_epoch", "no longer calls _run_epoch")


def test_set_initial_training_values_returns_eight_values(monkeypatch):
    monkeypatch.setattr(
        Trainer, "_inner_training_loop", _fake_loop(values=(*ti.INITIAL_TRAINING_VALUES, "sp_size"))
    )
    _assert_drift(ti.check_trainer_hooks, "Trainer.set_initial_training_values", "sp_size", "7 values")


def test_set_initial_training_values_reordered(monkeypatch):
    values = list(ti.INITIAL_TRAINING_VALUES)
    values[1], values[5] = values[5], values[1]  # steps_in_epoch <-> num_update_steps_per_epoch
    monkeypatch.setattr(Trainer, "_inner_training_loop", _fake_loop(values=tuple(values)))
    _assert_drift(ti.check_trainer_hooks, "Trainer.set_initial_training_values", "expected the 7 values")


def test_set_initial_training_values_new_parameter(monkeypatch):
    monkeypatch.setattr(Trainer, "set_initial_training_values", _with_params("args", "dataloader", "trial"))
    _assert_drift(ti.check_trainer_hooks, "Trainer.set_initial_training_values", "trial")


def test_set_initial_training_values_no_longer_called(monkeypatch):
    monkeypatch.setattr(Trainer, "_inner_training_loop", _fake_loop(sizes="compute_training_sizes"))
    _assert_drift(ti.check_trainer_hooks, "Trainer.set_initial_training_values", "no longer calls")


def test_init_training_state_renamed_parameter(monkeypatch):
    params = [p if p != "resume_from_checkpoint" else "checkpoint" for p in ti.INIT_TRAINING_STATE_PARAMETERS]
    monkeypatch.setattr(Trainer, "_init_training_state", _with_params(*params))
    _assert_drift(ti.check_trainer_hooks, "Trainer._init_training_state", "checkpoint")


def test_init_training_state_returns_three_values(monkeypatch):
    state = (*ti.INIT_TRAINING_STATE_VALUES, "samples_seen")
    monkeypatch.setattr(Trainer, "_inner_training_loop", _fake_loop(state=state))
    _assert_drift(ti.check_trainer_hooks, "Trainer._init_training_state", "samples_seen")


def test_init_training_state_no_longer_called(monkeypatch):
    monkeypatch.setattr(Trainer, "_inner_training_loop", _fake_loop(init="_restore_training_state"))
    _assert_drift(ti.check_trainer_hooks, "Trainer._init_training_state", "no longer calls")


def test_save_checkpoint_deleted(monkeypatch):
    monkeypatch.delattr(Trainer, "_save_checkpoint")
    _assert_drift(ti.check_trainer_hooks, "Trainer._save_checkpoint", "does not exist")


def test_save_checkpoint_no_longer_called_by_log_save_evaluate(monkeypatch):
    def _maybe_log_save_evaluate(
        self, tr_loss, grad_norm, model, trial, epoch, ignore, start, learning_rate=None
    ):
        self.save_model()

    monkeypatch.setattr(Trainer, "_maybe_log_save_evaluate", _maybe_log_save_evaluate)
    _assert_drift(ti.check_trainer_hooks, "Trainer._save_checkpoint", "no longer calls _save_checkpoint")


def test_save_checkpoint_writes_elsewhere(monkeypatch):
    # gqc_state.json is written to <_get_output_dir(trial)>/checkpoint-<step>: HF must still save there.
    def _save_checkpoint(self, model, trial):
        self.save_model(self.args.output_dir)

    monkeypatch.setattr(Trainer, "_save_checkpoint", _save_checkpoint)
    _assert_drift(ti.check_trainer_hooks, "Trainer._save_checkpoint", "_get_output_dir")


def test_metric_schedulers_no_longer_stepped_by_evaluation(monkeypatch):
    def _evaluate(self, trial, ignore_keys_for_eval, skip_scheduler=False):
        return self.evaluate(ignore_keys=ignore_keys_for_eval)

    monkeypatch.setattr(Trainer, "_evaluate", _evaluate)
    ti.check_trainer_hooks(metric_scheduler=False)  # only checked when such a scheduler is in use
    _assert_drift(
        lambda: ti.check_trainer_hooks(metric_scheduler=True),
        ti.METRIC_SCHEDULER_TOUCHPOINT,
        "ReduceLROnPlateau",
    )


def test_a_failed_check_runs_again_and_a_passed_one_does_not(monkeypatch):
    monkeypatch.delattr(Trainer, "_run_epoch")
    for _ in range(2):
        _assert_drift(ti.check_trainer_hooks, "Trainer._run_epoch")
    monkeypatch.undo()
    ti.check_trainer_hooks()
    monkeypatch.delattr(Trainer, "_run_epoch")
    ti.check_trainer_hooks()  # passed once in this process: not re-checked
    guard.reset_checks()
    _assert_drift(ti.check_trainer_hooks, "Trainer._run_epoch")


# ------------------------------------------------------------------------ private methods the package calls
_ANY = object()  # the check runs before the call: the trainer argument is never touched
CALLS = {
    "_load_rng_state": (("checkpoint",), lambda: ti.load_rng_state(_ANY, None)),
    "_maybe_log_save_evaluate": (
        ti.MAYBE_LOG_SAVE_EVALUATE_PARAMETERS,
        lambda: ti.maybe_log_save_evaluate(_ANY, None, None, None, 0, None, 0.0, None),
    ),
    "_clip_grad_norm": (("model",), lambda: ti.clip_grad_norm(_ANY, None)),
    "_track_num_input_tokens": (("inputs",), lambda: ti.track_num_input_tokens(_ANY, {})),
    "_get_learning_rate": ((), lambda: ti.get_learning_rate(_ANY)),
    "_get_output_dir": (("trial",), lambda: ti.output_dir(_ANY, None)),
    "_prepare_inputs": (("inputs",), lambda: ti.prepare_inputs(_ANY, {})),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_called_method_deleted(monkeypatch, name):
    monkeypatch.delattr(Trainer, name)
    _assert_drift(CALLS[name][1], f"Trainer.{name}", "does not exist")


@pytest.mark.parametrize("name", list(CALLS))
def test_called_method_gets_a_required_parameter(monkeypatch, name):
    passed, call = CALLS[name]
    monkeypatch.setattr(Trainer, name, _with_params(*passed, "new_required"))
    _assert_drift(call, f"Trainer.{name}", "new_required")


@pytest.mark.parametrize("name", [n for n in CALLS if CALLS[n][0]])
def test_called_method_renames_a_parameter(monkeypatch, name):
    passed, call = CALLS[name]
    monkeypatch.setattr(Trainer, name, _with_params("renamed", *passed[1:]))
    _assert_drift(call, f"Trainer.{name}", "renamed")


@pytest.mark.parametrize("name", list(CALLS))
def test_an_added_optional_parameter_is_no_drift(monkeypatch, name):
    passed, _ = CALLS[name]
    monkeypatch.setattr(Trainer, name, _with_params(*passed, optional=("new_optional",)))
    assert ti.CALL_CHECKS[f"Trainer.{name}"]() is None


def test_signature_columns_helper_deleted(monkeypatch, tiny_gpt2, tmp_path):
    from hf_gradext.arguments import GradExtArguments
    from hf_gradext.trainer import GradExtTrainer

    monkeypatch.delattr(Trainer, "_set_signature_columns_if_needed")
    args = GradExtArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    _assert_drift(
        lambda: GradExtTrainer(tiny_gpt2, args=args), "Trainer._signature_columns", "does not exist"
    )


def test_signature_columns_no_longer_a_list(monkeypatch):
    def fill(self):
        self._signature_columns = ("input_ids", "labels")

    trainer = SimpleNamespace(_set_signature_columns_if_needed=lambda: fill(trainer))
    _assert_drift(lambda: ti.signature_columns(trainer), "Trainer._signature_columns", "tuple")


def test_signature_columns_no_longer_filter_the_dataset(monkeypatch):
    def _remove_unused_columns(self, dataset, description=None):
        return dataset

    monkeypatch.setattr(Trainer, "_remove_unused_columns", _remove_unused_columns)
    trainer = SimpleNamespace(_set_signature_columns_if_needed=lambda: None, _signature_columns=[])
    _assert_drift(
        lambda: ti.signature_columns(trainer), "Trainer._signature_columns", "_remove_unused_columns"
    )


def test_signature_columns_on_a_real_trainer(tiny_gpt2, tmp_path):
    from transformers import TrainingArguments

    trainer = Trainer(tiny_gpt2, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))
    columns = ti.signature_columns(trainer)
    assert "input_ids" in columns and columns is trainer._signature_columns


def test_tr_loss_missing_on_the_trainer():
    _assert_drift(
        lambda: ti.accumulate_train_loss(SimpleNamespace(), torch.ones(())), "Trainer._tr_loss", "NoneType"
    )


def test_tr_loss_no_longer_set_by_the_loop(monkeypatch):
    def _inner_training_loop(self, batch_size=None, args=None, resume_from_checkpoint=None, trial=None):
        self._train_loss_accumulator = 0.0

    monkeypatch.setattr(Trainer, "_inner_training_loop", _inner_training_loop)
    trainer = SimpleNamespace(_tr_loss=torch.zeros(()))
    _assert_drift(lambda: ti.accumulate_train_loss(trainer, torch.ones(())), "Trainer._tr_loss")


def test_tr_loss_accumulates_in_place():
    loss = torch.zeros((), dtype=torch.float64)
    trainer = SimpleNamespace(_tr_loss=loss)
    ti.accumulate_train_loss(trainer, torch.tensor(1.5))
    assert trainer._tr_loss is loss and float(loss) == 1.5


def test_model_accepts_loss_kwargs_missing():
    _assert_drift(
        lambda: ti.model_accepts_loss_kwargs(SimpleNamespace()),
        "Trainer.model_accepts_loss_kwargs",
        "NoneType",
    )


def test_model_accepts_loss_kwargs_no_longer_read_by_compute_loss(monkeypatch):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return model(**inputs).loss

    monkeypatch.setattr(Trainer, "compute_loss", compute_loss)
    _assert_drift(
        lambda: ti.model_accepts_loss_kwargs(SimpleNamespace(model_accepts_loss_kwargs=True)),
        "Trainer.model_accepts_loss_kwargs",
        "compute_loss",
    )


def test_current_accumulation_steps_no_longer_read_by_training_step(monkeypatch):
    def training_step(self, model, inputs, num_items_in_batch=None):
        return self.compute_loss(model, inputs)

    monkeypatch.setattr(Trainer, "training_step", training_step)
    _assert_drift(
        lambda: ti.set_current_accumulation_steps(SimpleNamespace(), 1),
        "Trainer.current_gradient_accumulation_steps",
        "training_step",
    )
