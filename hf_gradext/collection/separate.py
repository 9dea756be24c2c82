"""The ``separate`` collection pass: an own fp32 forward/backward on a batch, outside training.

Runs in eval mode (no dropout: the gradients are a deterministic function of the parameters) with
autocast off and without touching any ``param.grad``, so the training step it sits in is unaffected:
the engine is a ``CaptureEngine(weight_grads=False)``, which freezes every parameter while armed, so the
backward computes only the captured ``(a, g)`` pairs and skips the ordinary weight gradients.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_gradext.collection.consumer import CaptureConsumer
from hf_gradext.collection.loop import loop_per_sample_gradients, selected_parameters, slice_batch
from hf_gradext.errors import UserFacingError
from hf_gradext.grad.capture import CaptureEngine

PROBE_FLAG = "--gradient_collection_probe_file"


@contextmanager
def eval_fp32(model: nn.Module):
    """Eval mode and autocast off for the duration; restores the training mode afterwards."""
    was_training = model.training
    device_type = next(model.parameters()).device.type
    model.eval()
    try:
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    finally:
        model.train(was_training)


def run_separate(
    model: nn.Module,
    batch: dict[str, Any],
    n: int,
    consumer: CaptureConsumer,
    engine: CaptureEngine | None,
    example_ids: list[Any],
) -> None:
    """Collect the first ``n`` samples of ``batch`` with an own fp32 pass (engine, or loop if ``engine``
    is None).

    Raises:
        ValueError: ``engine`` was built with ``weight_grads=True`` (its backward would write
            ``param.grad``).
    """
    if engine is not None and engine.weight_grads:
        raise ValueError(
            "run_separate needs a CaptureEngine(weight_grads=False): it must not write param.grad"
        )
    batch_size = batch["input_ids"].shape[0]
    sub = slice_batch(batch, slice(0, n), batch_size)
    consumer.begin_microbatch(example_ids[:n])
    with eval_fp32(model):
        if engine is None:
            params = selected_parameters(model, consumer.modules)
            consumer.add_dense(loop_per_sample_gradients(model, sub, params))
            return
        # Every parameter is frozen while armed: this backward writes no param.grad and computes no
        # weight gradient; the layer math in on_capture still sees the trainable ones (engine.specs).
        with torch.enable_grad(), engine.capture(sub):
            model(**sub).loss.backward()
    consumer.finish_microbatch()


def read_probe_texts(path: str | Path) -> list[str]:
    """Examples of a probe file: ``.txt`` one per non-empty line, ``.json`` (a list of strings or of
    objects with ``text``) or ``.jsonl`` (objects with ``text``).

    Raises:
        UserFacingError: unreadable, not UTF-8, invalid JSON (with the line), or no usable text (one line).
    """
    path = Path(path)
    fix = "one text per line (.txt), or JSON / JSON lines with a 'text' field"
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserFacingError(f"{PROBE_FLAG}={path} is not UTF-8 text (byte {exc.start}); {fix}") from None
    except OSError as exc:
        raise UserFacingError(f"{PROBE_FLAG}={path} cannot be read ({exc.strerror or exc}); {fix}") from None
    try:
        if path.suffix == ".jsonl":
            items = []
            for number, line in enumerate(raw.splitlines(), 1):
                if line.strip():
                    items.append(_json_line(line, number))
        elif path.suffix == ".json":
            items = json.loads(raw)
            if isinstance(items, dict):
                items = items.get("text", [])
        else:
            items = [line for line in raw.splitlines() if line.strip()]
    except ValueError as exc:
        raise UserFacingError(f"{PROBE_FLAG}={path} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(items, list):
        items = []
    texts = [it.get("text") if isinstance(it, dict) else it for it in items]
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise UserFacingError(
            f"{PROBE_FLAG}={path} holds no usable examples; one text per line or a 'text' field"
        )
    return texts


def _json_line(line: str, number: int) -> Any:
    try:
        return json.loads(line)
    except ValueError as exc:
        raise ValueError(f"line {number}: {exc.args[0] if exc.args else exc}") from None


def probe_batch(texts: list[str], tokenizer: Any, max_length: int, device: torch.device) -> dict[str, Any]:
    """Right-padded causal-LM batch of the probe texts; labels are ``-100`` on padding."""
    if tokenizer is None:
        raise UserFacingError(f"{PROBE_FLAG} needs a tokenizer: pass processing_class to the trainer")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    batch["example_id"] = torch.arange(len(texts))
    return {k: v.to(device) for k, v in batch.items()}
