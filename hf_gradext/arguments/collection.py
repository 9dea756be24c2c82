"""Per-sample gradient collection flags (``--collect_gradients`` and ``--gradient_collection_*``).

Everything that can be checked without a model is checked here, at parse time, so a bad flag fails
before any model or data is loaded. Layer patterns are resolved against the model by the callback,
before the first training step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from hf_gradext.errors import UserFacingError

COLLECTION_MODES = ("training", "separate")
COLLECTION_SAVE = ("full", "norms", "stats")
COLLECTION_DTYPES = ("float32", "bfloat16", "float16")
COLLECTION_METHODS = ("engine", "loop")
COLLECTION_ON_ERROR = ("raise", "warn")


@dataclass
class CollectionArguments:
    # --- switch and schedule
    collect_gradients: bool = field(
        default=False,
        metadata={"help": "Collect per-sample gradients during training (PerSampleGradientCallback)."},
    )
    gradient_collection_steps: int = field(
        default=100,
        metadata={"help": "Collect every N optimizer steps (steps N, 2N, ...)."},
    )
    gradient_collection_max_samples: int = field(
        default=8,
        metadata={"help": "At most this many samples per collected optimizer step (per rank)."},
    )
    # --- what to collect
    gradient_collection_layers: str = field(
        default="all",
        metadata={
            "help": "Layers to collect: all|attn|mlp|embed|norm, a comma list of those and/or regexes on "
            "module names (e.g. 'attn,h\\.0\\.mlp\\.c_fc')."
        },
    )
    gradient_collection_mode: str = field(
        default="training",
        metadata={
            "help": "training: taken from the training backward (no extra forward/backward); separate: "
            "an own fp32 forward/backward on the current batch or on --gradient_collection_probe_file.",
            "choices": list(COLLECTION_MODES),
        },
    )
    gradient_collection_probe_file: str | None = field(
        default=None,
        metadata={
            "help": "separate mode only: a fixed probe set (.txt one example per line, .json/.jsonl with a "
            "'text' field) whose per-sample gradients are taken after every collected step."
        },
    )
    gradient_collection_save: str = field(
        default="stats",
        metadata={
            "help": "full: per-sample gradients + norms to safetensors shards; norms: per-sample per-layer "
            "norms to shards; stats: only statistics, logged through the Trainer.",
            "choices": list(COLLECTION_SAVE),
        },
    )
    gradient_collection_dtype: str = field(
        default="float32",
        metadata={"help": "dtype of stored full gradients.", "choices": list(COLLECTION_DTYPES)},
    )
    # --- memory and storage
    gradient_collection_chunk_size: int = field(
        default=0,
        metadata={
            "help": "Samples materialized at once per layer (0 = as many as the memory budget allows)."
        },
    )
    gradient_collection_memory_budget_mb: float = field(
        default=1024.0,
        metadata={"help": "Extra memory allowed for materialized per-sample gradients, in MiB."},
    )
    gradient_collection_dir: str | None = field(
        default=None,
        metadata={"help": "Where shards go (default: <output_dir>/gradients)."},
    )
    # transformers 5 dropped this TrainingArguments flag; hf_gradext's row writers (gradient collection and
    # --project_gradients) honour it under the one output-directory policy (hf_gradext/store/policy.py).
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Remove the rows an earlier run left in --gradient_collection_dir / --proj_output_dir "
            "(logged) and start them over. Without it a fresh run refuses such a directory, and a run "
            "resumed with --resume_from_checkpoint must match the settings and weights that wrote it."
        },
    )
    gradient_collection_method: str = field(
        default="engine",
        metadata={
            "help": "engine: the one-backward capture engine; loop: one sample at a time (reference for "
            "tests and benchmarks only, slow).",
            "choices": list(COLLECTION_METHODS),
        },
    )
    gradient_collection_on_error: str = field(
        default="raise",
        metadata={
            "help": "When shards cannot be written (disk full, permissions): raise stops training; warn "
            "logs the error and continues training without collection.",
            "choices": list(COLLECTION_ON_ERROR),
        },
    )

    def _validate_collection(self) -> None:
        choices = {
            "gradient_collection_mode": COLLECTION_MODES,
            "gradient_collection_save": COLLECTION_SAVE,
            "gradient_collection_dtype": COLLECTION_DTYPES,
            "gradient_collection_method": COLLECTION_METHODS,
            "gradient_collection_on_error": COLLECTION_ON_ERROR,
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise UserFacingError(f"--{name}={value!r} is not valid; choose one of {', '.join(allowed)}")
        if self.gradient_collection_steps < 1:
            raise UserFacingError(
                f"--gradient_collection_steps={self.gradient_collection_steps} must be >= 1 (collect every N steps)"
            )
        if self.gradient_collection_max_samples < 1:
            raise UserFacingError(
                f"--gradient_collection_max_samples={self.gradient_collection_max_samples} must be >= 1; "
                "pass how many samples to collect per step"
            )
        if self.gradient_collection_chunk_size < 0:
            raise UserFacingError(
                f"--gradient_collection_chunk_size={self.gradient_collection_chunk_size} must be >= 0 "
                "(0 = derive it from --gradient_collection_memory_budget_mb)"
            )
        if not self.gradient_collection_memory_budget_mb > 0:
            raise UserFacingError(
                f"--gradient_collection_memory_budget_mb={self.gradient_collection_memory_budget_mb} must be > 0"
            )
        if not str(self.gradient_collection_layers or "").strip():
            raise UserFacingError(
                "--gradient_collection_layers is empty; pass all|attn|mlp|embed|norm or a module-name regex"
            )
        probe = self.gradient_collection_probe_file
        if probe is not None:
            if self.gradient_collection_mode != "separate":
                raise UserFacingError(
                    "--gradient_collection_probe_file needs --gradient_collection_mode separate "
                    "(training mode takes gradients from the training batch)"
                )
            if not os.path.isfile(probe):
                raise UserFacingError(
                    f"--gradient_collection_probe_file={probe} does not exist; pass an existing .txt/.json/.jsonl file"
                )
        if self.gradient_collection_method == "loop" and self.gradient_collection_mode == "training":
            raise UserFacingError(
                "--gradient_collection_method loop needs --gradient_collection_mode separate "
                "(the loop runs its own per-sample forward/backward passes)"
            )


def resolve_collection_dir(args: object) -> str:
    """``--gradient_collection_dir``, defaulting to ``<output_dir>/gradients``."""
    explicit = getattr(args, "gradient_collection_dir", None)
    if explicit:
        return os.path.expanduser(explicit)
    return os.path.join(getattr(args, "output_dir", None) or "trainer_output", "gradients")
