"""GQC refuses what it cannot run and verifies that its loop really runs.

* transformers reaches the GQC loop only through overridden private hooks; if a release stopped calling
  one, the run must stop with a clear error, never train at HF's fixed accumulation of 1;
* DeepSpeed and FSDP are refused at trainer construction (flags: already at parse time, test_arguments);
* metric-driven LR schedulers (reduce_lr_on_plateau, greedy) change the LR exactly as in HF's own loop.
"""

from __future__ import annotations

import copy
from types import MethodType

import accelerate
import pytest
import torch
from _gqc_tiny import gqc_args, tiny_model, token_dataset
from accelerate.utils import DistributedType
from transformers import Trainer

from hf_gradext.errors import UserFacingError
from hf_gradext.integrations import guard
from hf_gradext.trainer import GradExtTrainer

VERSION = guard.installed_version("transformers")


def _trainer(tmp_path, model=None, data=None, eval_data=None, **overrides) -> GradExtTrainer:
    return GradExtTrainer(
        model or tiny_model(),
        args=gqc_args(tmp_path, **overrides),
        train_dataset=data or token_dataset(24),
        eval_dataset=eval_data,
    )


def _unchanged(trainer: GradExtTrainer, init: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), init.parameters()))


def _train_bypassed(trainer: GradExtTrainer, hook: str) -> str:
    """Train with ``hook`` answered by HF's own method (as if transformers no longer called ours)."""
    setattr(trainer, hook, MethodType(getattr(Trainer, hook), trainer))
    with pytest.raises(guard.IntegrationError) as info:
        trainer.train()
    message = str(info.value)
    assert f"transformers {VERSION}" in message and "\n" not in message
    return message


# ---------------------------------------------------------------------------- the GQC loop really runs
def test_bypassed_gqc_loop_stops_before_any_training(tmp_path):
    init = tiny_model()
    trainer = _trainer(tmp_path, model=copy.deepcopy(init))
    message = _train_bypassed(trainer, "_run_epoch")  # HF's own epoch loop would run at accumulation 1
    assert message.startswith("Trainer._run_epoch: ") and "GQC loop was not called" in message
    assert trainer.state.global_step == 0 and _unchanged(trainer, init)  # not one backward, not one step
    assert not any(k.startswith("gqc/") for e in trainer.state.log_history for k in e)


def test_inner_training_loop_that_skips_run_epoch_is_caught(tmp_path, monkeypatch):
    # A release whose _inner_training_loop runs its epochs without calling self._run_epoch.
    init = tiny_model()
    trainer = _trainer(tmp_path, model=copy.deepcopy(init))  # built (and checked) on the real release
    real_loop = Trainer._inner_training_loop

    def inner_training_loop(self, *args, **kwargs):
        self._run_epoch = MethodType(Trainer._run_epoch, self)
        return real_loop(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_inner_training_loop", inner_training_loop)
    with pytest.raises(guard.IntegrationError, match=r"^Trainer\._run_epoch: .*GQC loop was not called"):
        trainer.train()
    assert trainer.state.global_step == 0 and _unchanged(trainer, init)


def test_uncalled_set_initial_training_values_is_caught(tmp_path):
    message = _train_bypassed(_trainer(tmp_path), "set_initial_training_values")
    assert message.startswith("Trainer.set_initial_training_values: ") and "did not call" in message


def test_uncalled_init_training_state_is_caught(tmp_path):
    message = _train_bypassed(_trainer(tmp_path), "_init_training_state")
    assert message.startswith("Trainer._init_training_state: ") and "did not call" in message


def test_drifted_hook_refused_at_construction_with_gqc_only(tmp_path, monkeypatch):
    def _run_epoch(self, model, epoch, train_dataloader, steps_in_epoch, num_update_steps_per_epoch, trial,
                   ignore_keys_for_eval, start_time, resume_from_checkpoint, epochs_trained,
                   steps_trained_in_current_epoch, epoch_iterator=None):  # fmt: skip
        return None

    guard.reset_checks()
    monkeypatch.setattr(Trainer, "_run_epoch", _run_epoch)
    with pytest.raises(guard.IntegrationError, match=r"^Trainer\._run_epoch: .*epoch_iterator"):
        _trainer(tmp_path / "gqc")
    _trainer(tmp_path / "none", gqc="none")  # HF's loop with HF's hooks: nothing of ours to check
    monkeypatch.undo()
    guard.reset_checks()


# ---------------------------------------------------------------------------------------- refused backends
@pytest.mark.parametrize(
    "kind, words",
    [
        (
            DistributedType.DEEPSPEED,
            r"does not support DeepSpeed: .*steps the optimizer inside every backward",
        ),
        (DistributedType.FSDP, r"does not support FSDP: .*DTensor gradients; use DDP .*cpu_ddp\.yaml"),
    ],
)
def test_deepspeed_and_fsdp_refused_at_construction(tmp_path, monkeypatch, kind, words):
    # e.g. an accelerate config the flags did not show (the flags themselves are refused at parse time)
    monkeypatch.setattr(accelerate.Accelerator, "distributed_type", property(lambda self: kind))
    with pytest.raises(UserFacingError, match=words) as info:
        _trainer(tmp_path)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------ metric-driven LR schedulers
def _lr_by_step(trainer) -> list[float]:
    return [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]


def _eval_every_step(tmp_path, gqc: str, scheduler: str, kwargs: dict) -> GradExtTrainer:
    trainer = _trainer(
        tmp_path,
        data=token_dataset(48),
        eval_data=token_dataset(4, seed=5),
        gqc=gqc,
        gqc_threshold_start=0.0,  # never met: every window runs to the cap of 2 microbatches
        gqc_max_microbatches=2,
        eval_strategy="steps",
        eval_steps=1,
        lr_scheduler_type=scheduler,
        lr_scheduler_kwargs=kwargs,
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize(
    "scheduler, kwargs",
    [
        # threshold 100 (abs): only the first evaluation counts as an improvement
        ("reduce_lr_on_plateau", {"factor": 0.5, "patience": 0, "threshold": 100.0, "threshold_mode": "abs"}),
        ("greedy", {"factor": 0.5, "patience": 0, "threshold": 100.0, "min_lr": 1e-6}),
    ],
)
def test_metric_driven_scheduler_changes_lr_as_in_hf(tmp_path, scheduler, kwargs):
    gqc = _eval_every_step(tmp_path / "gqc", "gnts", scheduler, kwargs)
    hf = _eval_every_step(tmp_path / "hf", "none", scheduler, kwargs)  # HF's own loop, one microbatch a step
    got, want = _lr_by_step(gqc), _lr_by_step(hf)
    assert len(got) == gqc.state.global_step == 6 and len(want) == 12
    assert got == pytest.approx(want[: len(got)])  # one scheduler step per evaluation, in both loops
    assert len(set(got)) > 1
    if scheduler == "reduce_lr_on_plateau":
        assert got == pytest.approx([1e-3 * 0.5 ** max(0, k - 1) for k in range(len(got))])
