"""Model / data / peft flags, named as in transformers' ``run_clm.py`` and TRL's ``ModelConfig``.

With no ``--model_name_or_path``, ``--dataset_name`` or ``--train_file`` the run is the *embedded
default*: a tiny GPT-2 built from scratch (``--config_name tiny``) on the corpus that ships with the
package, with a byte-level BPE tokenizer trained locally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from hf_gradext.errors import UserFacingError

# Built-in GPT-2 sizes for from-scratch training (``--config_name``); vocab_size comes from the tokenizer.
# `tiny` is sized so that the embedded default trains in about a minute on 2 CPU cores.
BUILTIN_GPT2_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 4, "n_head": 4, "n_embd": 128, "n_positions": 256},
    "small": {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024},
    "medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024, "n_positions": 1024},
    "large": {"n_layer": 36, "n_head": 20, "n_embd": 1280, "n_positions": 1024},
}
MODEL_DTYPES = ("auto", "bfloat16", "float16", "float32")
DATA_FILE_EXTENSIONS = ("txt", "text", "json", "jsonl", "csv")


@dataclass
class ModelDataArguments:
    # ------------------------------------------------------------------ model
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Pretrained model to fine-tune: a Hub id (e.g. 'gpt2') or a local directory saved with "
            "save_pretrained. Leave unset to train from scratch from --config_name."
        },
    )
    config_name: str | None = field(
        default=None,
        metadata={
            "help": "Architecture for from-scratch training: a built-in GPT-2 size "
            f"({', '.join(BUILTIN_GPT2_SIZES)}) or an HF config id/directory. Default: 'tiny' when "
            "--model_name_or_path is unset."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Override config attributes when training from scratch, e.g. 'n_embd=64,n_layer=2,resid_pdrop=0.0'."
        },
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer Hub id or directory. Default: the model's tokenizer, else a byte-level BPE "
            "trained locally on the embedded corpus (cached)."
        },
    )
    tokenizer_vocab_size: int = field(
        default=2048,
        metadata={"help": "Upper bound on the vocabulary of the locally trained BPE tokenizer."},
    )
    model_dtype: str | None = field(
        default=None,
        metadata={
            "help": "dtype to load --model_name_or_path weights in ('auto' = as saved). Mixed precision "
            "training is --bf16/--fp16.",
            "choices": list(MODEL_DTYPES),
            "aliases": ["--torch_dtype"],
        },
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where Hub models, tokenizers and datasets are cached."}
    )
    model_revision: str = field(
        default="main", metadata={"help": "Model revision (branch, tag or commit) on the Hub."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow custom model/tokenizer code from the Hub. Only for repositories you trust."},
    )
    # ------------------------------------------------------------------ data
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id (e.g. 'roneneldan/TinyStories') or a local dataset dir."},
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration name of --dataset_name."}
    )
    train_file: str | None = field(
        default=None, metadata={"help": "Local training data: a .txt, .json, .jsonl or .csv file."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Local validation data, same format as --train_file."}
    )
    text_column: str | None = field(
        default=None,
        metadata={"help": "Column holding the text. Default: 'text' if present, else the first column."},
    )
    validation_split_percentage: int = field(
        default=5,
        metadata={
            "help": "Percent of the training data held out for evaluation when there is no validation "
            "split/file (0 = no evaluation set)."
        },
    )
    block_size: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per training block after grouping. Default: min(1024, tokenizer max length, "
            "model positions)."
        },
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Keep only the first N training blocks (for quick runs and debugging)."},
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N evaluation blocks."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes used for tokenization and grouping."}
    )
    overwrite_cache: bool = field(
        default=False,
        metadata={"help": "Recompute tokenization/grouping instead of using the datasets cache."},
    )
    keep_linebreaks: bool = field(
        default=True, metadata={"help": "Keep line breaks when reading .txt files."}
    )
    # ------------------------------------------------------------------ peft (TRL ModelConfig names)
    use_peft: bool = field(
        default=False, metadata={"help": "Train LoRA adapters (peft) instead of all weights."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module names to wrap with LoRA (default: peft's choice for the model type, c_attn for GPT-2)."
        },
    )
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved alongside the adapters."}
    )
    # ------------------------------------------------------------------ early stopping
    early_stopping_patience: int | None = field(
        default=None,
        metadata={
            "help": "Stop after this many evaluations without improvement of --metric_for_best_model "
            "(default eval loss). Needs --eval_strategy steps|epoch."
        },
    )
    early_stopping_threshold: float = field(
        default=0.0, metadata={"help": "Minimum improvement that counts for --early_stopping_patience."}
    )

    def _validate_model_data(self) -> None:
        """Cheap checks that fail before anything is loaded; each message names the flag and the fix."""
        if self.config_name is None and self.model_name_or_path is None:
            self.config_name = "tiny"
        if self.model_name_or_path is not None and self.config_name in BUILTIN_GPT2_SIZES:
            raise UserFacingError(
                f"--config_name {self.config_name} builds a fresh model but --model_name_or_path is set too; "
                "drop one of them"
            )
        if self.config_overrides and self.model_name_or_path is not None:
            raise UserFacingError(
                "--config_overrides only applies to from-scratch training; drop it or --model_name_or_path"
            )
        if self.model_dtype is not None and self.model_dtype not in MODEL_DTYPES:
            raise UserFacingError(
                f"--model_dtype {self.model_dtype!r} is invalid; use one of {', '.join(MODEL_DTYPES)}"
            )
        if self.dataset_name and (self.train_file or self.validation_file):
            raise UserFacingError(
                "--dataset_name and --train_file/--validation_file are both set; use only one data source"
            )
        if self.validation_file and not self.train_file:
            raise UserFacingError("--validation_file needs --train_file; pass the training file as well")
        for flag, path in (("--train_file", self.train_file), ("--validation_file", self.validation_file)):
            if path is None:
                continue
            ext = path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""
            if ext not in DATA_FILE_EXTENSIONS:
                raise UserFacingError(
                    f"{flag} {path!r} has an unsupported extension; use .txt, .json, .jsonl or .csv"
                )
            if not os.path.isfile(path):
                raise UserFacingError(f"{flag} {path!r} does not exist; pass an existing data file")
        if not 0 <= self.validation_split_percentage < 100:
            raise UserFacingError(
                f"--validation_split_percentage {self.validation_split_percentage} must be in [0, 100)"
            )
        for flag, value in (
            ("--block_size", self.block_size),
            ("--max_train_samples", self.max_train_samples),
            ("--max_eval_samples", self.max_eval_samples),
            ("--preprocessing_num_workers", self.preprocessing_num_workers),
            ("--early_stopping_patience", self.early_stopping_patience),
        ):
            if value is not None and value < 1:
                raise UserFacingError(f"{flag} {value} must be >= 1 (or left unset)")
        if self.tokenizer_vocab_size < 300:
            raise UserFacingError(f"--tokenizer_vocab_size {self.tokenizer_vocab_size} must be >= 300")
        if self.lora_r < 1 or self.lora_alpha <= 0:
            raise UserFacingError("--lora_r must be >= 1 and --lora_alpha > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserFacingError(f"--lora_dropout {self.lora_dropout} must be in [0, 1)")
        if not self.early_stopping_threshold >= 0:
            raise UserFacingError(f"--early_stopping_threshold {self.early_stopping_threshold} must be >= 0")
        if self.early_stopping_patience is not None:
            self._validate_early_stopping()

    def _validate_early_stopping(self) -> None:
        # Runs before TrainingArguments.__post_init__, so strategies may still be plain strings.
        eval_strategy = str(
            getattr(getattr(self, "eval_strategy", "no"), "value", getattr(self, "eval_strategy", "no"))
        )
        if eval_strategy == "no":
            raise UserFacingError(
                "--early_stopping_patience needs evaluations; add --eval_strategy steps (or epoch)"
            )
        if getattr(self, "metric_for_best_model", None) is None:
            # HF's EarlyStoppingCallback requires a metric; eval loss is what run_clm users expect.
            self.metric_for_best_model = "loss"


def hub_kwargs(args: object) -> dict[str, object]:
    """The ``from_pretrained`` keywords that ``--cache_dir``, ``--model_revision`` and
    ``--trust_remote_code`` set (``args`` may be any namespace carrying some of them)."""
    return {
        "cache_dir": getattr(args, "cache_dir", None),
        "revision": getattr(args, "model_revision", "main"),
        "trust_remote_code": getattr(args, "trust_remote_code", False),
    }
