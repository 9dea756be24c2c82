"""GQC inside GradExtTrainer: window math, logs, bounds, NaN, resume, --gqc none."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from _gqc_tiny import gqc_args, tiny_model, token_dataset, train_kwargs
from transformers import TrainerCallback

from hf_gradext.trainer import GradExtTrainer


def _train(tmp_path, data=None, model=None, callbacks=(), observers=(), eval_data=None, **overrides):
    overrides_args = {k: v for k, v in overrides.items() if k != "resume_from_checkpoint"}
    trainer = GradExtTrainer(
        model or tiny_model(),
        args=gqc_args(tmp_path, **overrides_args),
        train_dataset=data or token_dataset(),
        eval_dataset=eval_data,
        callbacks=list(callbacks),
    )
    for obs in observers:
        trainer.add_microbatch_observer(obs)
    trainer.train(resume_from_checkpoint=overrides.get("resume_from_checkpoint"))
    return trainer


def _step_logs(trainer):
    return [e for e in trainer.state.log_history if "gqc/microbatches" in e]


class _Recorder:
    """Microbatch observer keeping every training microbatch's inputs (CPU copies)."""

    def __init__(self):
        self.inputs = []

    def before_microbatch(self, trainer, inputs, num_items_in_batch):
        self.inputs.append({k: v.detach().clone() for k, v in inputs.items()})

    def after_microbatch(self, trainer, inputs, loss):
        pass


class _GradAtFirstStep(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if self.grads is None:
            self.grads = [p.grad.detach().clone() for p in model.parameters()]


def test_stepped_gradient_is_exact_token_mean_of_window(tmp_path):
    # ragged labels: microbatches carry different label-token counts, so mean-of-means would differ
    data = token_dataset(24, ragged=True)
    init = tiny_model()
    rec, grab = _Recorder(), _GradAtFirstStep()
    trainer = _train(
        tmp_path,
        data=data,
        model=copy.deepcopy(init),
        callbacks=[grab],
        observers=[rec],
        gqc_threshold_start=0.0,
        gqc_max_microbatches=3,
        max_grad_norm=0.0,
    )
    window = rec.inputs[:3]
    assert _step_logs(trainer)[0]["gqc/microbatches"] == 3
    # oracle: one sum-reduced loss over every label token of the window, divided once
    total, count = 0.0, 0
    for mb in window:
        logits = init(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits[:, :-1]
        labels = mb["labels"][:, 1:]
        total = total + torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        count += int(labels.ne(-100).sum())
    (total / count).backward()
    for got, p in zip(grab.grads, init.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)
    assert _step_logs(trainer)[0]["gqc/window_tokens"] == count
    assert _step_logs(trainer)[0]["loss"] == pytest.approx(float(total.detach() / count), rel=1e-4)


def test_logs_per_step_and_run_totals(tmp_path):
    trainer = _train(tmp_path, gqc_threshold_start=1.2, gqc_max_microbatches=4, max_grad_norm=1.0)
    logs = _step_logs(trainer)
    assert len(logs) == trainer.state.global_step >= 2
    for key in ("gqc/microbatches", "gqc/grad_norm", "gqc/threshold", "gqc/tokens", "gqc/skipped_windows"):
        assert all(key in e for e in logs)
    assert all(1 <= e["gqc/microbatches"] <= 4 for e in logs)
    assert any(e["gqc/microbatches"] > 1 for e in logs)
    summary = trainer.state.log_history[-1]
    assert summary["gqc/total_microbatches"] == 12 == sum(e["gqc/microbatches"] for e in logs)
    assert summary["gqc/total_steps"] == len(logs)
    assert logs[-1]["gqc/tokens"] == 12 * 4 * 16
    # LR schedule over data: linear decay over 12 microbatches, stepped by microbatches consumed
    consumed = 0
    for e in logs:
        assert e["learning_rate"] == pytest.approx(1e-3 * (1 - consumed / 12))
        consumed += e["gqc/microbatches"]


def test_budget_and_max_steps_bound_the_run(tmp_path):
    t = _train(tmp_path / "a", gqc_microbatch_budget=5, gqc_threshold_start=100.0)
    assert t.state.log_history[-1]["gqc/total_microbatches"] == 5 and t.state.global_step == 5
    t = _train(tmp_path / "b", gqc_token_budget=3 * 64, gqc_threshold_start=100.0)
    assert t.state.log_history[-1]["gqc/total_tokens"] == 3 * 64
    t = _train(tmp_path / "c", max_steps=2, gqc_threshold_start=100.0)
    assert t.state.global_step == 2


class _PoisonThird:
    """Makes the 3rd microbatch's gradient NaN."""

    def __init__(self):
        self.n = 0

    def before_microbatch(self, trainer, inputs, num_items_in_batch):
        pass

    def after_microbatch(self, trainer, inputs, loss):
        self.n += 1
        if self.n == 3:
            next(trainer.model.parameters()).grad.fill_(float("nan"))


def test_nan_microbatch_is_skipped_and_counted(tmp_path):
    trainer = _train(tmp_path, observers=[_PoisonThird()], gqc_threshold_start=0.0, gqc_max_microbatches=2)
    summary = trainer.state.log_history[-1]
    assert summary["gqc/total_skipped_windows"] == 1
    assert summary["gqc/total_skipped_microbatches"] == 1  # window = [mb3]; mb1+mb2 stepped before
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.state.global_step == 5 + 1  # (12 - 1 skipped) microbatches: 5 full windows + 1 at the end


def test_resume_gives_identical_decisions_and_weights(tmp_path):
    kw = dict(
        gqc_threshold_start=1.3,
        gqc_max_microbatches=3,
        gqc_schedule="cosine",
        gqc_threshold_end=0.9,
        save_strategy="steps",
        save_steps=2,
        num_train_epochs=2,
    )
    full = _train(tmp_path / "full", model=tiny_model(dropout=0.1), **kw)
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert (ckpt / "gqc_state.json").is_file()
    state = json.loads((ckpt / "gqc_state.json").read_text())
    assert state["core"]["totals"]["steps"] == 2
    resumed = _train(
        tmp_path / "resumed", model=tiny_model(dropout=0.1), resume_from_checkpoint=str(ckpt), **kw
    )
    a = [(e["step"], e["gqc/microbatches"], e["gqc/grad_norm"]) for e in _step_logs(full) if e["step"] > 2]
    b = [(e["step"], e["gqc/microbatches"], e["gqc/grad_norm"]) for e in _step_logs(resumed) if e["step"] > 2]
    assert [x[:2] for x in a] == [x[:2] for x in b] and len(a) > 2
    assert [x[2] for x in a] == pytest.approx([x[2] for x in b], rel=1e-5)
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_resume_without_gqc_state_is_a_clear_error(tmp_path):
    from hf_gradext.errors import UserFacingError

    _train(tmp_path / "a", gqc_threshold_start=100.0, save_strategy="steps", save_steps=2, max_steps=2)
    ckpt = tmp_path / "a" / "checkpoint-2"
    os.remove(ckpt / "gqc_state.json")
    with pytest.raises(UserFacingError, match="gqc_state.json"):
        _train(tmp_path / "b", resume_from_checkpoint=str(ckpt))


def test_gqc_none_is_stock_hf(tmp_path):
    from transformers import Trainer, TrainingArguments

    t = _train(tmp_path / "a", gqc="none", gradient_accumulation_steps=2)
    assert not any("gqc/microbatches" in e for e in t.state.log_history)
    args = TrainingArguments(**train_kwargs(tmp_path / "b", gradient_accumulation_steps=2))
    ref = Trainer(tiny_model(), args=args, train_dataset=token_dataset())
    ref.train()
    for p, q in zip(t.model.parameters(), ref.model.parameters()):
        torch.testing.assert_close(p, q)


def test_lora_gradient_checkpointing_and_eval(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_model(),
        peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"),
    )
    t = _train(
        tmp_path,
        model=model,
        data=token_dataset(24),
        eval_data=token_dataset(8, seed=5),
        activation_checkpointing=True,
        eval_strategy="steps",
        eval_steps=2,
        gqc_threshold_start=0.5,
        gqc_max_microbatches=2,
    )
    assert any("eval_loss" in e for e in t.state.log_history)
    assert t.state.log_history[-1]["gqc/total_microbatches"] == 6


def test_sbc_gns_mht_run_in_trainer(tmp_path):
    for name, thr in (("sbc", 8.0), ("gns", 0.5), ("mht", 0.05)):
        t = _train(tmp_path / name, gqc=name, gqc_threshold_start=thr, gqc_max_microbatches=3)
        logs = _step_logs(t)
        assert sum(e["gqc/microbatches"] for e in logs) == 12
        if name == "sbc":
            assert [e["gqc/microbatches"] for e in logs] == [2] * 6


def test_microbatch_counts_are_not_read_on_the_host_before_the_forward():
    # Meta tensors cannot be read on the host; on a GPU such a read would stall the CPU before the forward.
    from types import SimpleNamespace

    from hf_gradext.gqc.loop import _counts

    meta = torch.device("meta")
    trainer = SimpleNamespace(_hf_gradext_shifts_labels=True)
    inputs = {
        "input_ids": torch.zeros(3, 8, dtype=torch.long, device=meta),
        "labels": torch.zeros(3, 8, dtype=torch.long, device=meta),
        "attention_mask": torch.ones(3, 8, dtype=torch.long, device=meta),
    }
    items, tokens, samples = _counts(trainer, inputs)
    assert items.device == meta and tokens.device == meta and samples == 3.0
    # on real tensors: label tokens after the causal shift, input tokens from the mask
    real = {
        "input_ids": torch.zeros(2, 4, dtype=torch.long),
        "labels": torch.tensor([[1, 2, -100, 4], [1, -100, -100, -100]]),
    }
    real["attention_mask"] = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    items, tokens, samples = _counts(trainer, real)
    assert (float(items), float(tokens), samples) == (2.0, 6.0, 2.0)


def test_window_scale_comes_from_the_one_mirror_of_hf_loss_scaling(tmp_path, monkeypatch):
    """The loop's token-sum multiplier is hf_loss_multiplier(trainer, 1), the function the capture uses."""
    from hf_gradext.integrations import loss as loss_integration

    real, asked = loss_integration.hf_loss_multiplier, []

    def recorder(trainer, num_items_in_batch, local_items=None):
        asked.append(num_items_in_batch)
        return real(trainer, num_items_in_batch, local_items)

    monkeypatch.setattr(loss_integration, "hf_loss_multiplier", recorder)
    trainer = _train(tmp_path, max_steps=1, gqc_threshold_start=0.0, gqc_max_microbatches=2)
    assert asked and set(asked) == {1}
    assert _step_logs(trainer)[0]["gqc/microbatches"] == 2
