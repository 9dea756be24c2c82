import math
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from hf_gradext.metrics import (
    build_compute_metrics,
    load_metric,
    metric_path,
    perplexity,
    preprocess_logits_for_metrics,
    shifted_token_pairs,
)


def test_metric_loads_offline_in_a_fresh_process():
    code = (
        "from hf_gradext.metrics import load_metric;"
        "print(load_metric('token_accuracy').compute(predictions=[1, 2, 3, 4], references=[1, 2, 0, 4]))"
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
    import os

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "{'accuracy': 0.75}" in out.stdout


def test_token_accuracy_matches_numpy_oracle():
    rng = np.random.default_rng(0)
    preds = rng.integers(0, 5, size=500)
    refs = rng.integers(0, 5, size=500)
    refs[rng.random(500) < 0.2] = -100
    keep = refs != -100
    expected = float((preds[keep] == refs[keep]).mean())
    got = load_metric().compute(predictions=preds, references=refs)["accuracy"]
    assert got == pytest.approx(expected)
    assert load_metric().compute(predictions=[1], references=[-100])["accuracy"] == 0.0


def test_unknown_local_metric():
    with pytest.raises(ValueError, match="token_accuracy"):
        metric_path("bleu")


def test_preprocess_logits_is_argmax():
    logits = torch.randn(2, 5, 11)
    assert torch.equal(preprocess_logits_for_metrics(logits, None), logits.argmax(-1))
    assert torch.equal(preprocess_logits_for_metrics((logits, "extra"), None), logits.argmax(-1))


def test_compute_metrics_shifts_and_ignores_padding():
    # Position t predicts label t+1: perfect predictions shifted by one must score 1.0.
    labels = np.array([[5, 6, 7, 8], [1, 2, -100, -100]])
    preds = np.array([[6, 7, 8, 0], [2, 9, 9, 9]])  # last position of each row has no target
    p, r = shifted_token_pairs(preds, labels)
    assert r.tolist() == [6, 7, 8, 2]
    compute = build_compute_metrics()
    assert compute(types.SimpleNamespace(predictions=preds, label_ids=labels))["accuracy"] == 1.0
    preds[0, 0] = 0
    assert compute(types.SimpleNamespace(predictions=preds, label_ids=labels))["accuracy"] == 0.75


def test_unshifted_pairs_follow_a_model_that_does_not_shift():
    labels = np.array([[5, 6, 7, 8], [1, 2, -100, -100]])
    preds = np.array([[5, 6, 7, 0], [1, 2, 9, 9]])
    p, r = shifted_token_pairs(preds, labels, shift=False)
    assert r.tolist() == [5, 6, 7, 8, 1, 2] and p.tolist() == [5, 6, 7, 0, 1, 2]
    compute = build_compute_metrics(shift=False)
    assert compute(types.SimpleNamespace(predictions=preds, label_ids=labels))["accuracy"] == 5 / 6
    # The causal default on the same arrays is a different (wrong here) alignment.
    assert (
        build_compute_metrics()(types.SimpleNamespace(predictions=preds, label_ids=labels))["accuracy"] < 0.5
    )


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(2.0) == pytest.approx(math.e**2)
    assert perplexity(1e6) == float("inf")
