"""Evaluation metrics shipped as local ``evaluate`` modules, loaded by path (no Hub access).

``run_clm.py`` computes eval accuracy with ``evaluate.load("accuracy")``, which downloads its script;
here :func:`load_metric` loads the same kind of module from this package. Perplexity is
``exp(eval_loss)`` (:func:`perplexity`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

METRICS_DIR = Path(__file__).resolve().parent
LOCAL_METRICS = ("token_accuracy",)


def metric_path(name: str) -> Path:
    """Directory of the local ``evaluate`` module ``name``."""
    if name not in LOCAL_METRICS:
        raise ValueError(f"unknown local metric {name!r}; choose one of {', '.join(LOCAL_METRICS)}")
    return METRICS_DIR / name


def load_metric(name: str = "token_accuracy", **kwargs: Any):
    """``evaluate.load`` of a local metric module by path. Kept in memory (no lock files shared by ranks)."""
    import evaluate

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(metric_path(name)), **kwargs)


def preprocess_logits_for_metrics(logits: Any, labels: torch.Tensor) -> torch.Tensor:
    """Reduce logits to predicted ids during evaluation, so only (B, T) ids are gathered, not (B, T, V)."""
    if isinstance(logits, tuple):
        # Some models return extra tensors (e.g. past_key_values) after the logits.
        logits = logits[0]
    return logits.argmax(dim=-1)  # (B, T)


def shifted_token_pairs(
    preds: Any, labels: Any, ignore_index: int = -100, shift: bool = True
) -> tuple[Any, Any]:
    """Align predictions with their targets and drop ignored positions. Returns flat numpy arrays.

    ``shift`` (a causal LM's loss, :func:`hf_gradext.integrations.loss.shifts_labels`): ``preds[:, t]``
    predicts ``labels[:, t + 1]``; without it ``preds[:, t]`` predicts ``labels[:, t]`` (labels that are
    already shifted, or a model whose loss does not shift).
    """
    import numpy as np

    preds, labels = np.asarray(preds), np.asarray(labels)
    if shift:
        preds, labels = preds[:, :-1], labels[:, 1:]  # (B, T-1) each
    preds, labels = preds.reshape(-1), labels.reshape(-1)  # (B * T',)
    keep = labels != ignore_index
    return preds[keep], labels[keep]


def build_compute_metrics(metric: Any | None = None, shift: bool = True) -> Callable[[Any], dict[str, float]]:
    """A ``compute_metrics`` for ``Trainer``: token accuracy over non-ignored labels.

    ``shift``: whether the model's loss shifts labels (causal LM, the default); pass
    ``hf_gradext.integrations.loss.shifts_labels(model)`` to follow the model's own loss.
    """
    metric = metric if metric is not None else load_metric("token_accuracy")

    def compute_metrics(eval_preds: Any) -> dict[str, float]:
        preds, labels = eval_preds.predictions, eval_preds.label_ids
        if isinstance(preds, tuple):
            preds = preds[0]
        p, r = shifted_token_pairs(preds, labels, shift=shift)
        return metric.compute(predictions=p, references=r)

    return compute_metrics


def perplexity(loss: float) -> float:
    """``exp(loss)``, or ``inf`` when it overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


__all__ = [
    "LOCAL_METRICS",
    "METRICS_DIR",
    "build_compute_metrics",
    "load_metric",
    "metric_path",
    "perplexity",
    "preprocess_logits_for_metrics",
    "shifted_token_pairs",
]
