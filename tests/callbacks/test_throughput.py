"""Throughput callback: token counting, window arithmetic (fake clock), and keys in log_history."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_gradext import GradExtArguments, GradExtTrainer
from hf_gradext.callbacks import throughput
from hf_gradext.callbacks.throughput import ThroughputCallback, build_callback, peak_memory_gb

VOCAB, SEQ = 64, 16


class _FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_window_metrics_with_a_fake_clock(monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr(throughput.time, "perf_counter", clock)
    cb = ThroughputCallback()
    cb.on_train_begin(None, type("S", (), {"global_step": 0})(), None)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # 13 real tokens
    cb.before_microbatch(None, {"input_ids": torch.zeros(2, 8), "attention_mask": mask}, None)
    cb.before_microbatch(None, {"input_ids": torch.zeros(3, 4)}, None)  # no mask: 12 tokens by shape
    clock.now += 5.0
    metrics = cb.collect(global_step=2, device=torch.device("cpu"))
    assert metrics[throughput.TOKENS_PER_SECOND] == 25 / 5.0
    assert metrics[throughput.STEP_TIME] == 2.5
    assert metrics[throughput.PEAK_RSS] > 0
    # The next window starts empty.
    clock.now += 1.0
    assert cb.collect(global_step=3, device=torch.device("cpu"))[throughput.TOKENS_PER_SECOND] == 0


def test_peak_memory_on_cpu_is_rss():
    key, value = peak_memory_gb(torch.device("cpu"))
    assert key == throughput.PEAK_RSS and 0.01 < value < 10_000


def _trainer(tmp_path, **kw):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ, bos_token_id=0, eos_token_id=0
        )
    )
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(12):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        rows.append(
            {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones(SEQ, dtype=torch.long)}
        )
    args = GradExtArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **kw,
    )
    return GradExtTrainer(model=model, args=args, train_dataset=rows)


def test_keys_land_in_log_history(tmp_path):
    trainer = _trainer(tmp_path)
    assert any(isinstance(cb, ThroughputCallback) for cb in trainer.callback_handler.callbacks)
    trainer.train()
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(train_logs) == 3
    for entry in train_logs:
        assert entry[throughput.TOKENS_PER_SECOND] > 0
        assert entry[throughput.STEP_TIME] > 0
        assert entry[throughput.PEAK_RSS] > 0
    # The final summary (train_loss, train_runtime, ...) is not a window log.
    assert throughput.TOKENS_PER_SECOND not in trainer.state.log_history[-1]


def test_flag_off_means_no_callback(tmp_path):
    trainer = _trainer(tmp_path, throughput_logging=False)
    assert build_callback(trainer) is None
    assert not any(isinstance(cb, ThroughputCallback) for cb in trainer.callback_handler.callbacks)
    trainer.train()
    assert all(throughput.TOKENS_PER_SECOND not in h for h in trainer.state.log_history)
