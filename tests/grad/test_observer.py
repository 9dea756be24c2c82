"""Per-sample gradients out of the *training* backward (GradExtTrainer, gradient accumulation 2)."""

from __future__ import annotations

import pytest
import torch
from _grad_helpers import VOCAB, dense, rel_err, tiny_gpt2
from torch.utils.data import Dataset

from hf_gradext import GradExtArguments, GradExtTrainer
from hf_gradext.grad import CaptureEngine, LossScale, TrainingCaptureObserver, per_sample_gradients
from hf_gradext.grad.factors import materialize_sum
from hf_gradext.grad.observer import hf_trainer_loss_scale


class Ragged(Dataset):
    def __init__(self, n: int = 16) -> None:
        g = torch.Generator().manual_seed(3)
        lengths = torch.randint(3, 13, (n,), generator=g)
        self.rows = [torch.randint(1, VOCAB, (int(k),), generator=g) for k in lengths]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i]}


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    seq = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), seq, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = r["input_ids"]
        mask[i, : len(r["input_ids"])] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100 if seq > 3 else labels[:, 0]  # a prompt token with no loss
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("loss_kwargs", [True, False], ids=["num_items_in_batch", "mean_loss"])
def test_training_backward_equals_standalone(tmp_path, loss_kwargs):
    model = tiny_gpt2(True, dtype=torch.float32)
    args = GradExtArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=0.0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=100,
        seed=0,
    )
    trainer = GradExtTrainer(model=model, args=args, train_dataset=Ragged(), data_collator=collate)
    trainer.model_accepts_loss_kwargs = loss_kwargs  # False: HF's plain token mean / GA steps
    seen: list[tuple[dict, dict]] = []

    def on_done(engine: CaptureEngine, inputs: dict) -> None:
        grads = {n: dense(materialize_sum(cs)) for n, cs in engine.contributions(torch.float64).items()}
        seen.append(({k: v.clone() for k, v in inputs.items()}, grads))

    engine = CaptureEngine(trainer.model, "all")
    trainer.add_microbatch_observer(TrainingCaptureObserver(engine, on_done=on_done))
    trainer.train()
    engine.remove()
    assert len(seen) == 4  # 2 optimizer steps x 2 microbatches, every one captured
    for inputs, grads in seen:
        ref = per_sample_gradients(model, inputs, dtype=torch.float64)
        for name, r in ref.items():
            assert rel_err(grads[name], dense(r)) <= 1e-5, name


def test_should_capture_selects_microbatches(tmp_path):
    model = tiny_gpt2(True, dtype=torch.float32)
    args = GradExtArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=100,
    )
    trainer = GradExtTrainer(model=model, args=args, train_dataset=Ragged(), data_collator=collate)
    calls = []
    engine = CaptureEngine(trainer.model, "norm", keep=False, on_capture=lambda *a: calls.append(a[0]))
    picks = iter([True, False, False, True])
    trainer.add_microbatch_observer(TrainingCaptureObserver(engine, should_capture=lambda t, i: next(picks)))
    trainer.train()
    n_norms = len(engine.modules)
    assert len(calls) == 2 * n_norms and not engine._armed


class _FakeAccelerator:
    def __init__(self, num_processes: int) -> None:
        self.num_processes = num_processes
        self.gradient_accumulation_steps = 1
        self.distributed_type = "MULTI_GPU"
        self.scaler = None


class _FakeTrainer:
    """Just the attributes hf_trainer_loss_scale reads (a DDP rank's view)."""

    def __init__(self, world: int, average: bool, tp: int = 1) -> None:
        self.tp = tp
        self.args = type("A", (), {"n_gpu": 1, "average_tokens_across_devices": average})()
        self.accelerator = _FakeAccelerator(world)
        self.model = tiny_gpt2(True, dtype=torch.float32)
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = None
        self.compute_loss_func = None
        self.label_smoother = None
        self.current_gradient_accumulation_steps = 2

    def get_tp_size(self) -> int:
        return self.tp


@pytest.mark.parametrize("world,average,tp", [(1, True, 1), (4, True, 1), (4, False, 1), (4, True, 2)])
def test_loss_scale_world_size(world, average, tp):
    labels = torch.tensor([[-100, 5, 6, 7], [-100, 5, -100, -100]])
    scale = hf_trainer_loss_scale(_FakeTrainer(world, average, tp), {"labels": labels}, torch.tensor(40))
    # loss = S_mb / 40 * (world // tp if average): sample i's factor is 40 / (n_i * world // tp)
    mult = world // tp if average else 1
    assert torch.allclose(
        scale.sample_scale, torch.tensor([40 / 3 / mult, 40 / 1 / mult], dtype=torch.float64)
    )
    assert isinstance(scale, LossScale)


def test_loss_scale_inverts_the_one_mirror_of_hf_scaling(monkeypatch):
    """hf_trainer_loss_scale is 1 / (c n_i) with c = hf_loss_multiplier (what the GQC loop uses too)."""
    from hf_gradext.grad import observer

    asked = []

    def fake(trainer, num_items_in_batch, local_items=None):
        asked.append((num_items_in_batch, int(local_items)))
        return 0.25

    monkeypatch.setattr(observer, "hf_loss_multiplier", fake)
    labels = torch.tensor([[-100, 5, 6, 7], [-100, 5, -100, -100]])
    scale = hf_trainer_loss_scale(_FakeTrainer(1, False), {"labels": labels}, 40)
    assert asked == [(40, 4)]
    assert torch.allclose(
        scale.sample_scale, torch.tensor([1 / (0.25 * 3), 1 / (0.25 * 1)], dtype=torch.float64)
    )
