"""accelerate internals (hf_gradext.integrations.accelerate): each drift, simulated, is one clear error."""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
from accelerate import data_loader
from accelerate.state import GradientState

from hf_gradext.integrations import accelerate as ai
from hf_gradext.integrations import guard
from tests.integrations.drift import assert_drift

VERSION = guard.installed_version("accelerate")


@pytest.fixture
def accelerator():
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    yield acc
    acc.gradient_state.sync_gradients = True  # the shared state as HF leaves it (setter may be patched)


_assert_drift = functools.partial(assert_drift, "accelerate")


def test_every_check_passes_on_the_installed_accelerate():
    ai.check_all()


def test_set_sync_gradients_on_the_installed_accelerate(accelerator):
    ai.set_sync_gradients(accelerator, False)
    assert accelerator.sync_gradients is False
    ai.set_sync_gradients(accelerator, True)
    assert accelerator.sync_gradients is True


def test_sync_gradients_setter_deleted(monkeypatch, accelerator):
    monkeypatch.delattr(GradientState, "_set_sync_gradients")
    _assert_drift(lambda: ai.set_sync_gradients(accelerator, True), ai.SYNC_GRADIENTS, "does not exist")


def test_sync_gradients_setter_renamed_parameter(monkeypatch, accelerator):
    def _set_sync_gradients(self, value):
        self.sync_gradients = value

    monkeypatch.setattr(GradientState, "_set_sync_gradients", _set_sync_gradients)
    _assert_drift(lambda: ai.set_sync_gradients(accelerator, True), ai.SYNC_GRADIENTS, "sync_gradients")


def test_sync_gradients_setter_without_effect(monkeypatch, accelerator):
    ai.set_sync_gradients(accelerator, False)
    monkeypatch.setattr(GradientState, "_set_sync_gradients", lambda self, sync_gradients: None)
    _assert_drift(lambda: ai.set_sync_gradients(accelerator, True), ai.SYNC_GRADIENTS, "left accelerator")


def test_skip_first_batches_on_the_installed_accelerate():
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2)
    assert [b.tolist() for b in ai.skip_first_batches(loader, 2)] == [[4, 5], [6, 7]]


def test_skip_first_batches_deleted(monkeypatch):
    monkeypatch.delattr(data_loader, "skip_first_batches")
    _assert_drift(lambda: ai.skip_first_batches([], 1), ai.SKIP_FIRST_BATCHES, "does not exist")


def test_skip_first_batches_renamed_parameter(monkeypatch):
    def skip_first_batches(dataloader, skip=0):
        return dataloader

    monkeypatch.setattr(data_loader, "skip_first_batches", skip_first_batches)
    _assert_drift(lambda: ai.skip_first_batches([], 1), ai.SKIP_FIRST_BATCHES, "num_batches")
    assert "skip" in inspect.signature(data_loader.skip_first_batches).parameters


def test_unwrap_model_on_the_installed_accelerate():
    model = torch.nn.Linear(2, 2)
    assert ai.unwrap_model(torch.compile(model)) is model
    assert ai.unwrap_model(model) is model


def test_unwrap_model_can_no_longer_drop_compile_wrappers(monkeypatch):
    from accelerate import utils

    def extract_model_from_parallel(model, keep_fp32_wrapper=True, recursive=False):
        return model

    monkeypatch.setattr(utils, "extract_model_from_parallel", extract_model_from_parallel)
    _assert_drift(lambda: ai.unwrap_model(torch.nn.Linear(2, 2)), ai.EXTRACT_MODEL, "keep_torch_compile")
