"""Does the model's loss shift labels (hf_gradext.integrations.loss): the one answer, and its drifts."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.loss import loss_utils

from hf_gradext.integrations import guard
from hf_gradext.integrations import loss as li
from tests.helpers import make_tiny_gpt2
from tests.integrations.drift import assert_drift

VERSION = guard.installed_version("transformers")


_assert_drift = functools.partial(assert_drift, "transformers")


def _tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2)
    return T5ForConditionalGeneration(config)


# ------------------------------------------------------------------------------------- the installed release
def test_every_check_passes_on_the_installed_transformers():
    li.check_all()


def test_answers_on_real_models():
    gpt2 = make_tiny_gpt2()
    assert gpt2.loss_type is None  # GPT-2 names no loss type, yet its loss is the causal-LM one
    assert li.shifts_labels(gpt2)
    assert not li.shifts_labels(nn.Linear(2, 2))  # no built-in loss
    assert not li.shifts_labels(_tiny_t5())  # encoder-decoder: labels are not shifted
    masked = make_tiny_gpt2()
    masked.loss_function = loss_utils.ForMaskedLMLoss  # an explicitly set loss wins, as in the forward
    assert not li.shifts_labels(masked)


def test_wrappers_are_looked_through():
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(
        make_tiny_gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    assert li.shifts_labels(lora)
    compiled = torch.compile(make_tiny_gpt2())  # an OptimizedModule: nothing is compiled until it runs
    assert li.shifts_labels(compiled)


def test_gqc_loop_asks_the_one_function(monkeypatch):
    from types import SimpleNamespace

    from hf_gradext.grad.observer import trainer_shifts_labels  # what the GQC loop and the observer ask

    asked = []

    def recorder(model):
        asked.append(model)
        return True

    monkeypatch.setattr(li, "shifts_labels", recorder)
    model = nn.Linear(2, 2)
    assert trainer_shifts_labels(SimpleNamespace(model=model)) is True
    assert asked == [model]
    # cached per trainer: asked once for each, however often a microbatch asks
    trainer, other = SimpleNamespace(model="m"), SimpleNamespace(model="n")
    assert [trainer_shifts_labels(t) for t in (trainer, trainer, other, trainer)] == [True] * 4
    assert asked == [model, "m", "n"]


# ------------------------------------------------------------------------------------------------- drifts
def test_causal_lm_loss_stops_shifting(monkeypatch):
    monkeypatch.setattr(loss_utils, "ForCausalLMLoss", loss_utils.ForMaskedLMLoss)
    _assert_drift(lambda: li.shifts_labels(make_tiny_gpt2()), li.CAUSAL_LM_LOSS, "shifted token-sum")


def test_causal_lm_loss_ignores_num_items(monkeypatch):
    original = loss_utils.ForCausalLMLoss

    def mean_loss(logits, labels, vocab_size, num_items_in_batch=None, **kwargs):
        return original(logits, labels, vocab_size, num_items_in_batch=None, **kwargs)

    monkeypatch.setattr(loss_utils, "ForCausalLMLoss", mean_loss)
    _assert_drift(lambda: li.shifts_labels(make_tiny_gpt2()), li.CAUSAL_LM_LOSS, "num_items_in_batch=1")


def test_causal_lm_loss_type_resolves_elsewhere(monkeypatch):
    monkeypatch.setitem(loss_utils.LOSS_MAPPING, "ForCausalLM", loss_utils.ForMaskedLMLoss)
    _assert_drift(lambda: li.shifts_labels(make_tiny_gpt2()), li.LOSS_FUNCTION, "ForMaskedLMLoss")


def test_loss_function_property_gone(monkeypatch):
    monkeypatch.delattr(PreTrainedModel, "loss_function")
    _assert_drift(lambda: li.shifts_labels(make_tiny_gpt2()), li.LOSS_FUNCTION, "not a property")


# ------------------------------------------------------------------------------ the one shift answer
def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=50, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def test_answers_for_gpt2_llama_t5_and_their_peft_wrappers():
    peft = pytest.importorskip("peft")
    gpt2, llama, t5 = make_tiny_gpt2(), _tiny_llama(), _tiny_t5()
    assert gpt2.loss_type is None and li.shifts_labels(gpt2)  # loss_type None in 5.23 / 5.24: still shifts
    assert li.shifts_labels(llama)
    assert not li.shifts_labels(t5)
    wrapped = {
        "gpt2": peft.get_peft_model(make_tiny_gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn"])),
        "llama": peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"])),
        "t5": peft.get_peft_model(_tiny_t5(), peft.LoraConfig(r=2, target_modules=["q"])),
    }
    assert {k: li.shifts_labels(m) for k, m in wrapped.items()} == {"gpt2": True, "llama": True, "t5": False}


def test_every_caller_uses_the_one_function():
    from hf_gradext.grad import api, loss_scaling, observer
    from hf_gradext.projection import projector

    # one function object, imported (not re-implemented) by the engine, the observer and the projector
    assert loss_scaling.shifts_labels is li.shifts_labels
    assert api.shifts_labels is li.shifts_labels
    assert observer.loss_integration is li  # looked up per trainer: observer.trainer_shifts_labels
    assert projector.shifts_labels is li.shifts_labels


def test_projector_scale_follows_the_model_not_its_config():
    from hf_gradext.grad import LossScale
    from hf_gradext.projection import KroneckerProjector

    batch = {"labels": torch.tensor([[5, 6, 7, -100], [5, 6, -100, -100]])}
    for model, shift in ((make_tiny_gpt2(), True), (_tiny_t5(), False)):
        proj = KroneckerProjector(model, layers="attn", rank_total=4, rank_min=2)
        want = LossScale.batch_mean(batch, shift=shift).sample_scale
        assert torch.equal(proj.loss_scale(batch).sample_scale, want)
    masked = make_tiny_gpt2()
    masked.loss_function = loss_utils.ForMaskedLMLoss  # the config still says decoder-only
    proj = KroneckerProjector(masked, layers="attn", rank_total=4, rank_min=2)
    assert torch.equal(
        proj.loss_scale(batch).sample_scale, LossScale.batch_mean(batch, shift=False).sample_scale
    )


# ------------------------------------------------------------------------------ HF's loss scale, mirrored
def _hf_trainer(tmp_path, **args):
    from transformers import Trainer, TrainingArguments

    model = make_tiny_gpt2(vocab_size=61, n_positions=32, n_embd=16, dtype=torch.float32, training=True)
    targs = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=3, gradient_accumulation_steps=2,
        use_cpu=True, report_to=[], save_strategy="no", **args,
    )  # fmt: skip
    trainer = Trainer(model=model, args=targs)
    trainer.current_gradient_accumulation_steps = 2  # inside an accumulation window, as HF's loop sets it
    return trainer


def _shifted_token_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )


def _token_sum_over_n(outputs, labels, num_items_in_batch=None):
    return _shifted_token_sum(outputs.logits, labels) / num_items_in_batch


CASES = {
    "num_items": dict(n=37),
    "num_items_world": dict(n=37, average=True, world=(4, 2)),  # 4 processes, tensor parallel 2
    "no_loss_kwargs": dict(n=37, accepts=False),
    "no_num_items": dict(n=None),
    "scaled_for_ga": dict(n=37, accepts=False, scaled_for_ga=True),
    "compute_loss_func": dict(n=37, custom=True, average=True, world=(2, 1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_multiplier_is_what_hf_training_step_backwards(tmp_path, monkeypatch, case):
    """HF's own training_step (GA window of 2) against ``hf_loss_multiplier * grad S_mb``."""
    spec = CASES[case]
    trainer = _hf_trainer(tmp_path, average_tokens_across_devices=spec.get("average", False))
    if "world" in spec:
        processes, tp = spec["world"]
        monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: processes))
        monkeypatch.setattr(trainer, "get_tp_size", lambda: tp)
    trainer.model_accepts_loss_kwargs = spec.get("accepts", True)
    if "scaled_for_ga" in spec:
        trainer.loss_is_scaled_for_ga = spec["scaled_for_ga"]
    if spec.get("custom"):
        trainer.compute_loss_func = _token_sum_over_n
    model = trainer.model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 61, (3, 9), generator=g)
    labels = ids.clone()
    labels[0, :4] = labels[2, 6:] = -100  # ragged targets: n_mb differs from B * (T - 1)
    inputs = {"input_ids": ids, "labels": labels}
    n = None if spec["n"] is None else torch.tensor(spec["n"])

    model.zero_grad()
    trainer.training_step(model, dict(inputs), n)
    hf = [p.grad.clone() for p in model.parameters()]

    local = labels[:, 1:].ne(-100).sum()
    mult = li.hf_loss_multiplier(trainer, n, local)
    model.zero_grad()
    (float(mult) * _shifted_token_sum(model(input_ids=ids).logits, labels)).backward()
    ours = [p.grad for p in model.parameters()]
    err = max(float((a - b).norm() / b.norm()) for a, b in zip(ours, hf))
    assert err <= 1e-5, (case, float(mult), err)
    expected = {
        "num_items": 1 / 37,
        "num_items_world": 2 / 37,
        "no_loss_kwargs": 1 / (int(local) * 2),
        "no_num_items": 1 / (int(local) * 2),
        "scaled_for_ga": 1 / int(local),
        "compute_loss_func": 2 / 37,
    }[case]
    assert float(mult) == pytest.approx(expected, rel=1e-12)


def test_loss_multiplier_needs_the_local_count_for_a_mean_loss(tmp_path):
    trainer = _hf_trainer(tmp_path)
    trainer.model_accepts_loss_kwargs = False
    with pytest.raises(ValueError, match="local_items"):
        li.hf_loss_multiplier(trainer, 37)


def test_world_scale_drift(monkeypatch):
    from transformers import Trainer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return model(**inputs).loss  # no longer scales by the world size

    monkeypatch.setattr(Trainer, "compute_loss", compute_loss)
    _assert_drift(li.check_all, li.WORLD_SCALE, "no longer calls average_tokens_across_devices")


def test_ga_scale_drift(monkeypatch):
    from transformers import Trainer

    def training_step(self, model, inputs, num_items_in_batch=None):
        return model(**inputs).loss

    monkeypatch.setattr(Trainer, "training_step", training_step)
    _assert_drift(li.check_all, li.GA_SCALE, "no longer calls loss_is_scaled_for_ga")
