"""Model construction for ``hf-gradext train``: config, weights, embedding resize, patches, LoRA.

Order matters and is fixed here: build/load the model -> resize its embeddings to the tokenizer ->
apply the architecture patches (``hf_gradext.patches``) -> wrap with peft LoRA. Patches come before
LoRA so that LoRA wraps the final modules (a patch that swaps an MLP would otherwise discard the
adapters that wrap it).
"""

from __future__ import annotations

import logging
from typing import Any

from hf_gradext.arguments.model import BUILTIN_GPT2_SIZES, hub_kwargs
from hf_gradext.errors import UserFacingError
from hf_gradext.hub import load_pretrained

logger = logging.getLogger(__name__)


def build_config(args: Any, tokenizer: Any = None) -> Any:
    """The model config: a built-in GPT-2 size, an HF config id/dir, or the pretrained model's config.

    Built-in sizes take ``vocab_size`` and the bos/eos/pad ids from ``tokenizer``; ``--config_overrides``
    ("k=v,k=v") is applied last.
    """
    from transformers import AutoConfig, GPT2Config

    name = getattr(args, "config_name", None)
    if getattr(args, "model_name_or_path", None) is None and name in BUILTIN_GPT2_SIZES:
        special = {}
        if tokenizer is not None:
            special = {
                "vocab_size": len(tokenizer),
                "bos_token_id": tokenizer.bos_token_id
                if tokenizer.bos_token_id is not None
                else tokenizer.eos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            }
        config = GPT2Config(**BUILTIN_GPT2_SIZES[name], **special)
    else:
        source, flag = (name, "--config_name") if name else (args.model_name_or_path, "--model_name_or_path")
        config = load_pretrained(
            AutoConfig.from_pretrained, source, flag=flag, what="config", **hub_kwargs(args)
        )
    overrides = getattr(args, "config_overrides", None)
    if overrides:
        try:
            config.update_from_string(overrides)
        except ValueError as exc:
            raise UserFacingError(
                f"--config_overrides {overrides!r}: {exc}; use 'key=value,key=value'"
            ) from exc
    return config


def max_positions(config: Any) -> int | None:
    """The longest sequence the model can embed (GPT-2 ``n_positions``), or None when unbounded/unknown."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_block_size(args: Any, tokenizer: Any, config: Any) -> int:
    """``--block_size`` checked against the model's positions, or run_clm.py's default."""
    from hf_gradext.data import default_block_size

    limit = max_positions(config)
    block_size = getattr(args, "block_size", None)
    if block_size is None:
        return default_block_size(tokenizer, limit)
    if limit is not None and block_size > limit:
        raise UserFacingError(
            f"--block_size {block_size} exceeds the model's {limit} positions (n_positions); "
            f"use --block_size {limit} or less"
        )
    return block_size


def _dtype(name: str | None) -> Any:
    import torch

    if name in (None, "auto"):
        return name
    return getattr(torch, name)


def load_model(args: Any, tokenizer: Any, config: Any | None = None) -> Any:
    """Load or build the causal LM, resize embeddings, apply patches, wrap with LoRA (``--use_peft``).

    Raises:
        UserFacingError: the model is neither a local directory nor fetchable from the Hub nor cached
            (see :mod:`hf_gradext.hub`).
    """
    from transformers import AutoModelForCausalLM

    from hf_gradext.patches import apply_from_args, check_not_legacy_checkpoint

    config = config if config is not None else build_config(args, tokenizer)
    check_not_legacy_checkpoint(config)  # before loading weights: a legacy patched GPT-2 would load stock
    name = getattr(args, "model_name_or_path", None)
    if name is not None:
        kwargs: dict[str, Any] = {}
        if getattr(args, "model_dtype", None) is not None:
            kwargs["dtype"] = _dtype(args.model_dtype)
        model = load_pretrained(
            AutoModelForCausalLM.from_pretrained,
            name,
            flag="--model_name_or_path",
            what="model",
            config=config,
            **hub_kwargs(args),
            **kwargs,
        )
    else:
        model = AutoModelForCausalLM.from_config(
            config, trust_remote_code=getattr(args, "trust_remote_code", False)
        )
        logger.info(
            "built %s from scratch: %.2fM parameters", type(model).__name__, model.num_parameters() / 1e6
        )

    # Only grow: shrinking would drop rows a pretrained checkpoint relies on (run_clm.py does the same).
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))

    model = apply_from_args(args, model)

    if getattr(args, "use_peft", False):
        if name is None:
            # Legal (and handy in tests), but the saved adapters need the same random base to be useful.
            logger.warning(
                "--use_peft on a model built from scratch: only the adapters are trained and saved"
            )
        model = wrap_lora(args, model)
    return model


def wrap_lora(args: Any, model: Any) -> Any:
    """peft LoRA with TRL's ``ModelConfig`` flag names; prints the trainable parameter count."""
    from peft import LoraConfig, get_peft_model

    from hf_gradext.patches import is_gpt2_config

    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=getattr(args, "lora_target_modules", None) or None,
        modules_to_save=getattr(args, "lora_modules_to_save", None) or None,
        # HF GPT-2's Conv1D stores W as [in, out]; peft needs to know (it warns and flips it otherwise).
        fan_in_fan_out=is_gpt2_config(model.config),
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        first = (str(exc).strip().splitlines() or ["ValueError"])[0][:200]
        raise UserFacingError(
            f"--lora_target_modules: {first}; name modules that exist in the model"
        ) from exc
    trainable, total = model.get_nb_trainable_parameters()
    logger.info(
        "LoRA: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / max(total, 1)
    )
    return model
