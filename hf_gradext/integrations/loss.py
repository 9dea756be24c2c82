"""Does the model's built-in loss shift labels? The one answer the package uses.

Causal LM losses predict ``labels[..., t + 1]`` from position ``t``: position 0 of each row is never a
target, so label-token counts (the GQC window's token mean, per-sample rescaling) must be taken over
``labels[..., 1:]``. Both the GQC loop (:func:`hf_gradext.gqc.loop._shifts_labels`) and the capture
engine (:func:`hf_gradext.grad.loss_scaling.shifts_labels`) delegate here.

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
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from hf_gradext.integrations import accelerate as accelerate_integration
from hf_gradext.integrations import peft as peft_integration
from hf_gradext.integrations.guard import check_once

PACKAGE = "transformers"
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


def check_all() -> None:
    """Every check of this module."""
    _checks()
