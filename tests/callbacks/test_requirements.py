"""Collection / projection callbacks on a trainer that cannot drive them: one clear error at construction."""

from __future__ import annotations

import pytest
from transformers import Trainer, TrainingArguments

from hf_gradext.arguments import GradExtArguments
from hf_gradext.callbacks.collection import PerSampleGradientCallback
from hf_gradext.callbacks.projection import GradientProjectionCallback
from hf_gradext.errors import UserFacingError
from hf_gradext.trainer import GradExtTrainer
from tests.helpers import make_tiny_gpt2

CALLBACKS = (PerSampleGradientCallback, GradientProjectionCallback)


@pytest.mark.parametrize("callback", CALLBACKS)
def test_plain_trainer_is_refused_naming_gradext_trainer(tmp_path, callback):
    trainer = Trainer(
        model=make_tiny_gpt2(), args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    )
    with pytest.raises(UserFacingError) as info:
        callback(trainer)
    message = str(info.value)
    assert "\n" not in message and "got Trainer" in message and "GradExtTrainer" in message, message


@pytest.mark.parametrize("callback", CALLBACKS)
def test_gradext_trainer_with_plain_training_arguments_is_refused(tmp_path, callback):
    trainer = GradExtTrainer(
        model=make_tiny_gpt2(), args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    )
    with pytest.raises(UserFacingError, match="TrainingArguments does not have.*GradExtArguments"):
        callback(trainer)


def test_mixin_order_gives_a_trainer_the_callbacks_can_drive(tmp_path):
    class MyTrainer(GradExtTrainer, Trainer):  # what a TRL user writes: class T(GradExtTrainer, SFTTrainer)
        pass

    args = GradExtArguments(str(tmp_path), report_to=[], use_cpu=True, collect_gradients=True)
    trainer = MyTrainer(model=make_tiny_gpt2(), args=args)
    assert any(isinstance(c, PerSampleGradientCallback) for c in trainer.callback_handler.callbacks)
