"""Patches flags: GPT-2 architecture patches and the throughput/memory logging callback.

The seed-004 training optimizations transformers already has are plain ``TrainingArguments`` flags
and are not duplicated here: ``--bf16`` / ``--fp16``, ``--dataloader_pin_memory``,
``--dataloader_num_workers``, ``--dataloader_persistent_workers``, ``--train_sampling_strategy group_by_length``
(see docs/patches.md).
"""

from dataclasses import dataclass, field

from hf_gradext.errors import UserFacingError


@dataclass
class PatchesArguments:
    # ---- GPT-2 architecture patches (hf_gradext.patches.gpt2)
    gpt2_causal_mask_cache: bool | None = field(
        default=None,
        metadata={
            "help": "true/false. Cache GPT-2 causal masks per (seq len, dtype, device, attention impl) and skip the "
            "host-device syncs of HF mask creation; outputs are unchanged. Unset: on for GPT-2 models, "
            "ignored for others; an explicit true on a non-GPT-2 model is an error."
        },
    )
    gpt2_rms_norm: bool = field(
        default=False,
        metadata={
            "help": "Replace GPT-2's LayerNorms by RMSNorm (torch fused rms_norm). The model is saved as "
            "model_type gpt2_gradext, which AutoModelForCausalLM.from_pretrained rebuilds after import "
            "hf_gradext; on a stock checkpoint the LayerNorm biases are dropped (listed in a warning)."
        },
    )
    gpt2_swiglu: bool = field(
        default=False,
        metadata={
            "help": "Replace GPT-2's GELU MLP by SwiGLU: down(silu(gate(x)) * up(x)), bias-free Linears. "
            "Saved as model_type gpt2_gradext; on a stock checkpoint the MLP weights are new (listed in a warning)."
        },
    )
    swiglu_hidden_size: int | None = field(
        default=None,
        metadata={
            "help": "SwiGLU hidden width (needs --gpt2_swiglu). Default round(8*n_embd/3) keeps the weight "
            "count of the GELU MLP (2048 for GPT-2 small)."
        },
    )
    # ---- Logging (hf_gradext.callbacks.throughput)
    throughput_logging: bool = field(
        default=True,
        metadata={
            "help": "Add tokens_per_second, step_time_s and peak memory (CUDA: peak_accelerator_memory_gb, "
            "CPU: peak_rss_gb) to every training log; memory is queried at logging steps only."
        },
    )

    def _validate_patches(self) -> None:
        if self.swiglu_hidden_size is not None:
            if not self.gpt2_swiglu:
                raise UserFacingError(
                    "--swiglu_hidden_size only applies with --gpt2_swiglu; add --gpt2_swiglu or drop it"
                )
            if self.swiglu_hidden_size <= 0:
                raise UserFacingError(
                    f"--swiglu_hidden_size must be a positive integer, got {self.swiglu_hidden_size}; "
                    "leave it unset to keep the GELU MLP's weight count"
                )
