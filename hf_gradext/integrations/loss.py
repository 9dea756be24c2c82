"""HF's loss conventions, answered in one place: does the loss shift labels, and by what is it scaled.

**Shift.** Causal LM losses predict ``labels[..., t + 1]`` from position ``t``: position 0 of each row is
never a target, so label-token counts (the GQC window's token mean, per-sample rescaling, projection) must
be taken over ``labels[..., 1:]``. :func:`shifts_labels` is the package's one answer; the GQC loop, the
capture engine's loss scaling (:mod:`hf_gradext.grad.loss_scaling` re-exports it) and the projector
import it.

The answer is read from the loss function the model's forward will really call: the public
``PreTrainedModel.loss_function`` property (an explicitly set ``loss_function``, else the one its
``loss_type`` maps to, else transformers' default ``ForCausalLMLoss``), compared by identity with
``transformers.loss.loss_utils.ForCausalLMLoss``. HF's own ``Trainer._loss_shifts_labels`` is not used:
it only reads ``loss_type``, which is ``None`` for e.g. GPT-2 although GPT-2's loss does shift.

Checked once: ``ForCausalLMLoss`` still computes the *shifted* token-sum cross-entropy when given
``num_items_in_batch=1`` (evaluated on a 1x4 example: the GQC loop's token-sum loss depends on both
halves), and it is what the property resolves the causal-LM loss type to. Wrappers are looked through
with :func:`hf_gradext.integrations.accelerate.unwrap_model` and
:func:`hf_gradext.integrations.peft.base_model`.

**Scale.** :func:`hf_loss_multiplier` is the one mirror of how ``Trainer.training_step`` /
``compute_loss`` scale a microbatch's token-loss sum ``S_mb`` before the backward (transformers 5.23 and
5.24)::

    loss = S_mb / num_items_in_batch            # model accepts loss kwargs (or compute_loss_func) and N given
           * (num_processes // tp_size)          # ... and args.average_tokens_across_devices
    or   = S_mb / n_mb / current_gradient_accumulation_steps   # otherwise (the model's plain token mean)
    loss = loss / accelerator.gradient_accumulation_steps (1 under Trainer) * grad_scaler.scale (fp16)

The per-sample capture (:func:`hf_gradext.grad.observer.hf_trainer_loss_scale`) inverts it; the GQC loop
(which passes ``num_items_in_batch=1``) divides its window gradient by it. Checked once: ``compute_loss``
still reads ``average_tokens_across_devices`` and ``get_tp_size``, ``training_step`` still reads
``loss_is_scaled_for_ga`` and ``current_gradient_accumulation_steps``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from hf_gradext.integrations import accelerate as accelerate_integration
from hf_gradext.integrations import peft as peft_integration
from hf_gradext.integrations.guard import check_once

PACKAGE = "transformers"
WORLD_SCALE = "Trainer.compute_loss(average_tokens_across_devices)"
GA_SCALE = "Trainer.training_step(loss_is_scaled_for_ga)"
CAUSAL_LM_LOSS = "transformers.loss.loss_utils.ForCausalLMLoss"
LOSS_FUNCTION = "PreTrainedModel.loss_function"
CAUSAL_LM_LOSS_TYPE = "ForCausalLM"


def _check_causal_lm_loss() -> str | None:
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 4, 5, generator=g)
    labels = torch.tensor([[1, 2, -100, 3]])
    got = ForCausalLMLoss(logits, labels, vocab_size=5, num_items_in_batch=1)
    want = torch.nn.functional.cross_entropy(
        logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum"
    )
    if not torch.allclose(got.detach().float(), want, rtol=1e-5, atol=1e-6):
        return (
            f"ForCausalLMLoss(num_items_in_batch=1) gave {float(got):.6f}, not the shifted token-sum "
            f"cross-entropy {float(want):.6f}"
        )
    return None


def _check_loss_function() -> str | None:
    from transformers import PreTrainedModel
    from transformers.loss.loss_utils import ForCausalLMLoss

    prop = getattr(PreTrainedModel, "loss_function", None)
    if not isinstance(prop, property):
        return "PreTrainedModel.loss_function is not a property"
    resolved = prop.fget(SimpleNamespace(loss_type=CAUSAL_LM_LOSS_TYPE))
    if resolved is not ForCausalLMLoss:
        name = getattr(resolved, "__name__", type(resolved).__name__)
        return f"loss_type {CAUSAL_LM_LOSS_TYPE!r} resolves to {name}, not ForCausalLMLoss"
    return None


def _checks() -> None:
    check_once(CAUSAL_LM_LOSS, PACKAGE, _check_causal_lm_loss)
    check_once(LOSS_FUNCTION, PACKAGE, _check_loss_function)


def shifts_labels(model: Any) -> bool:
    """Whether ``model``'s built-in loss is HF's causal-LM loss (logit ``t`` predicts ``labels[t + 1]``).

    Wrappers (DDP, ``torch.compile``, peft) are looked through. Encoder-decoder models never shift
    (their decoder inputs are the right-shifted labels); modules that are no ``PreTrainedModel`` have
    no built-in loss and do not shift.

    Raises:
        IntegrationError: transformers' causal-LM loss or its resolution drifted.
    """
    from transformers import PreTrainedModel

    _checks()
    inner = peft_integration.base_model(accelerate_integration.unwrap_model(model))
    if not isinstance(inner, PreTrainedModel):
        return False
    if inner.config.is_encoder_decoder:
        return False
    from transformers.loss.loss_utils import ForCausalLMLoss

    return inner.loss_function is ForCausalLMLoss


# ------------------------------------------------------------------------------------------- loss scale
def _check_world_scale() -> str | None:
    from hf_gradext.integrations.trainer import calls_problem

    for name in ("average_tokens_across_devices", "get_tp_size", "num_processes"):
        problem = calls_problem("compute_loss", name)
        if problem:
            return problem
    return None


def _check_ga_scale() -> str | None:
    from hf_gradext.integrations.trainer import calls_problem

    for name in ("loss_is_scaled_for_ga", "current_gradient_accumulation_steps", "compute_loss_func"):
        problem = calls_problem("training_step", name)
        if problem:
            return problem
    return None


def _scale_checks() -> None:
    check_once(WORLD_SCALE, PACKAGE, _check_world_scale)
    check_once(GA_SCALE, PACKAGE, _check_ga_scale)


def hf_world_factor(trainer: Any) -> int:
    """What ``compute_loss`` multiplies a token-sum loss by under ``average_tokens_across_devices``.

    ``num_processes // tp_size`` (tensor-parallel ranks share a batch), or ``n_gpu`` under DataParallel.
    """
    args = trainer.args
    if getattr(args, "n_gpu", 1) > 1:
        return int(args.n_gpu)
    return int(trainer.accelerator.num_processes) // int(trainer.get_tp_size())


def hf_loss_multiplier(
    trainer: Any,
    num_items_in_batch: torch.Tensor | int | float | None,
    local_items: torch.Tensor | int | float | None = None,
) -> torch.Tensor | float:
    """``c`` such that ``trainer.training_step(model, inputs, num_items_in_batch)`` backwards ``c * S_mb``.

    ``S_mb`` is the microbatch's token-loss sum over its ``local_items`` loss targets (``labels != -100``,
    after the shift). See the module doc for the formula; a ``compute_loss_func`` is assumed to divide its
    token sum by ``num_items_in_batch`` as HF's own losses do.

    Args:
        trainer: a ``transformers.Trainer``.
        num_items_in_batch: what is passed to ``training_step`` (HF: the window's target count over ranks).
        local_items: the microbatch's own target count; needed only when the loss is the model's plain
            token mean (no loss kwargs, or no ``num_items_in_batch``).

    Returns:
        A float, or a device scalar when an input is one (never read on the host: no GPU sync).

    Raises:
        IntegrationError: HF's scaling code no longer reads what this mirrors.
        ValueError: the loss is a plain mean and ``local_items`` is missing.
    """
    from hf_gradext.grad.loss_scaling import reciprocal
    from hf_gradext.integrations.trainer import model_accepts_loss_kwargs

    _scale_checks()
    args = trainer.args
    custom = getattr(trainer, "compute_loss_func", None) is not None
    by_items = (model_accepts_loss_kwargs(trainer) or custom) and num_items_in_batch is not None
    mult: torch.Tensor | float
    if by_items:
        mult = reciprocal(num_items_in_batch)
        if args.average_tokens_across_devices:
            mult = mult * hf_world_factor(trainer)
    else:
        if local_items is None:
            raise ValueError("hf_loss_multiplier: the loss is a plain token mean; pass local_items")
        items = local_items.clamp_min(1) if isinstance(local_items, torch.Tensor) else max(local_items, 1)
        mult = reciprocal(items)
    scaled_for_ga = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled_for_ga is None:  # HF's default: normalized by num_items_in_batch, by the model or a custom loss
        scaled_for_ga = (model_accepts_loss_kwargs(trainer) and num_items_in_batch is not None) or custom
    if not scaled_for_ga:
        mult = mult / trainer.current_gradient_accumulation_steps
    accelerator = trainer.accelerator
    if accelerator.distributed_type != "DEEPSPEED":  # a str enum; deepspeed scales by itself
        mult = mult / accelerator.gradient_accumulation_steps
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        mult = mult * float(scaler.get_scale())  # fp16: the backwarded loss is multiplied by the scale
    return mult


def check_all() -> None:
    """Every check of this module."""
    _checks()
    _scale_checks()
