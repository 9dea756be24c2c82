"""Gradient collection must not cost the training logs a single key (issue #11, item 4).

The statistics of a collected step ride in HF's own log entry of that step when HF logs it, and in an
entry of their own otherwise; every key HF (and the GQC / throughput extensions) would have logged is
still there, at every step.
"""

import pytest

from tests.collection._tiny import make_trainer

STATS_KEY = "grad_collection/total/norm_mean"
GQC = dict(gqc="gnts", gqc_threshold_start=1e9, gqc_max_microbatches=2, max_steps=-1, num_train_epochs=1)


def _training_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("gqc", [False, True], ids=["fixed", "gqc"])
def test_every_step_keeps_its_loss_and_collected_steps_their_statistics(tmp_path, gqc):
    extra = GQC if gqc else dict(max_steps=4)
    trainer = make_trainer(
        tmp_path, gradient_collection_steps=2, gradient_collection_save="stats", disable_tqdm=True, **extra
    )
    trainer.train()
    steps = trainer.state.global_step
    assert steps >= 4
    logs = _training_logs(trainer)
    assert [h["step"] for h in logs] == list(range(1, steps + 1)), "a step lost its training log"
    for entry in logs:
        assert {"grad_norm", "learning_rate", "tokens_per_second"} <= set(entry)
        if gqc:
            assert "gqc/microbatches" in entry and "gqc/threshold" in entry
    collected = {h["step"]: h for h in logs if STATS_KEY in h}
    assert sorted(collected) == list(range(2, steps + 1, 2))  # merged into HF's entry of that step
    assert all(h["grad_collection/step"] == s for s, h in collected.items())
    # Nothing is logged twice: one entry per step carries the statistics.
    assert sum(STATS_KEY in h for h in trainer.state.log_history) == len(collected)


def test_statistics_of_steps_hf_does_not_log_get_an_entry_of_their_own(tmp_path):
    trainer = make_trainer(
        tmp_path, max_steps=6, logging_steps=3, gradient_collection_steps=2, gradient_collection_save="stats"
    )
    trainer.train()
    assert [h["step"] for h in _training_logs(trainer)] == [3, 6]
    stats = [h for h in trainer.state.log_history if STATS_KEY in h]
    assert [h["grad_collection/step"] for h in stats] == [2, 4, 6]
    assert [h["step"] for h in stats] == [2, 4, 6]
    assert "loss" in stats[-1]  # step 6 is logged by HF: the statistics joined that entry
    assert not any("loss" in h for h in stats[:2])


def test_hf_default_logging_still_logs_the_training_loss(tmp_path):
    trainer = make_trainer(
        tmp_path,
        max_steps=4,
        logging_steps=2,
        gradient_collection_steps=2,
        gradient_collection_save="stats",
    )
    trainer.train()
    assert [h["step"] for h in _training_logs(trainer)] == [2, 4]
    assert all(STATS_KEY in h for h in _training_logs(trainer))


def test_statistics_are_never_dropped_when_a_later_callback_cancels_hf_log(tmp_path):
    from transformers import TrainerCallback

    class CancelLogs(TrainerCallback):  # runs after the collection callback
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (2, 4):
                control.should_log = False

    trainer = make_trainer(
        tmp_path, max_steps=4, gradient_collection_steps=2, gradient_collection_save="stats"
    )
    trainer.add_callback(CancelLogs())
    trainer.train()
    stats = [h for h in trainer.state.log_history if STATS_KEY in h]
    # step 2's statistics at the next step end, step 4's (the last) at train end, each exactly once
    assert [h["grad_collection/step"] for h in stats] == [2, 4]
    assert [h["step"] for h in _training_logs(trainer)] == [1, 3]
