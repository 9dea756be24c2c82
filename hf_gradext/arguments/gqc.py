"""GQC (Gradient Quality Control: adaptive gradient accumulation) flags.

What each controller reads from ``--gqc_threshold_start/_end`` (the scheduled value):

* ``gnts``: an upper bound on the norm of the window's mean gradient (absolute, or a fraction of the
  running single-microbatch gradient norm with ``--gqc_threshold_mode relative``);
* ``sbc``: the logical batch size in samples (summed over ranks);
* ``gns``: the noise tolerance (step when the noise statistic <= microbatches * tolerance);
* ``gns_sample``: the noise tolerance (step when B_simple / N_eff <= tolerance, from per-sample norms);
* ``seesaw``: the first window's size in microbatches (an integer; doubled where the LR would halve,
  see :mod:`hf_gradext.gqc.lr_coupling`); the end value and schedule are not read;
* ``mht``: the percent-error bound of the loss confidence interval (``--gqc_mht_confidence``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from hf_gradext.arguments.ranges import NON_NEGATIVE, POSITIVE_INT, Range, check_ranges
from hf_gradext.errors import UserFacingError

GQC_CONTROLLERS = ("none", "gnts", "sbc", "gns", "gns_sample", "seesaw", "mht")
GQC_SCHEDULES = ("constant", "cosine", "half_cosine", "quarter_cosine", "linear", "polynomial")
GQC_LR_COUPLINGS = ("none", "sqrt", "linear")

# HF LR schedulers stepped with an eval metric by HF's evaluation (not once per optimizer step). They
# work with --gqc unchanged: the GQC loop reaches HF's evaluation, which steps them as HF's loop would.
METRIC_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")

_USE_DDP = (
    "use DDP instead (accelerate launch with a multi_gpu config: recipes/accelerate/multi_gpu_bf16.yaml, "
    "or recipes/accelerate/cpu_ddp.yaml on the CPU)"
)
DEEPSPEED_REFUSAL = (
    "--gqc {gqc} does not support DeepSpeed: DeepSpeed's engine steps the optimizer inside every backward "
    "(its accumulation boundary, 1 under --gqc), so the controller could not decide when to step; " + _USE_DDP
)
FSDP_REFUSAL = (
    "--gqc {gqc} does not support FSDP: the GQC loop's gradient norm, mean rescale and non-finite checks "
    "are not verified on FSDP's sharded DTensor gradients; " + _USE_DDP
)


GQC_RANGES: dict[str, Range] = {
    "gqc_max_microbatches": POSITIVE_INT,
    "gqc_threshold_start": NON_NEGATIVE,
    "gqc_threshold_end": NON_NEGATIVE,
    "gqc_schedule_power": Range(low=0, low_open=True),
    "gqc_relative_ema": Range(low=0, high=1, low_open=True),
    "gqc_warmup_ratio": Range(low=0, high=1, high_open=True),
    "gqc_warmup_steps": NON_NEGATIVE,
    "gqc_warmup_multiplier": Range(low=0, low_open=True),
    "gqc_microbatch_budget": NON_NEGATIVE,
    "gqc_token_budget": NON_NEGATIVE,
    "gqc_mht_confidence": Range(low=0, high=1, low_open=True, high_open=True),
    "gqc_mht_beta": Range(low=0, high=1, low_open=True),
    "gqc_gns_ema": Range(low=0, high=1, low_open=True),
    "gqc_sample_norm_every": POSITIVE_INT,
    "gqc_lr_coupling_k0": NON_NEGATIVE,
}


def _env_flag(name: str) -> bool:
    """An ``accelerate launch`` switch (``ACCELERATE_USE_DEEPSPEED`` / ``ACCELERATE_USE_FSDP``)."""
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class GQCArguments:
    # ---- controller
    gqc: str = field(
        default="none",
        metadata={
            "help": "Gradient quality control: decide after every microbatch whether to step the optimizer "
            "(gnts: mean-gradient norm threshold; sbc: scheduled logical batch size; gns: gradient noise "
            "scale; gns_sample: noise scale from per-sample gradient norms; seesaw: window doubles where "
            "the LR would halve; mht: loss hypothesis test). 'none' keeps HF's fixed accumulation.",
            "choices": list(GQC_CONTROLLERS),
        },
    )
    gqc_max_microbatches: int = field(
        default=64,
        metadata={
            "help": "Hard cap on microbatches per optimizer step (per rank); the window steps at the cap."
        },
    )
    # ---- threshold schedule (advances with data consumed, measured in microbatches)
    gqc_threshold_start: float = field(
        default=1.0,
        metadata={
            "help": "Scheduled controller value after warmup (meaning depends on --gqc, see docs/gqc.md)."
        },
    )
    gqc_threshold_end: float | None = field(
        default=None,
        metadata={
            "help": "Scheduled value at the end of the data budget (default: equal to the start value)."
        },
    )
    gqc_schedule: str = field(
        default="constant",
        metadata={
            "help": "Shape of the schedule from --gqc_threshold_start to --gqc_threshold_end over the data budget.",
            "choices": list(GQC_SCHEDULES),
        },
    )
    gqc_schedule_power: float = field(
        default=2.0, metadata={"help": "Exponent of the 'polynomial' schedule (1.0 is linear)."}
    )
    gqc_threshold_mode: str = field(
        default="absolute",
        metadata={
            "help": "gnts only: 'absolute' compares the mean-gradient norm to the value itself; 'relative' "
            "compares it to value x a running (EMA) estimate of the single-microbatch gradient norm, so "
            "the same value works across models and scales.",
            "choices": ["absolute", "relative"],
        },
    )
    gqc_relative_ema: float = field(
        default=0.1,
        metadata={"help": "gnts relative mode: EMA weight of each new single-microbatch norm (0 < x <= 1)."},
    )
    gqc_warmup_ratio: float = field(
        default=0.0,
        metadata={
            "help": "Fraction of the data budget (in microbatches) spent in the threshold's inverse warmup."
        },
    )
    gqc_warmup_steps: int = field(
        default=0,
        metadata={"help": "Microbatches of threshold warmup (overrides --gqc_warmup_ratio when > 0)."},
    )
    gqc_warmup_multiplier: float = field(
        default=1.0,
        metadata={
            "help": "Inverse warmup: the value starts at start x multiplier and moves linearly to start "
            "over the warmup (> 1 starts permissive for gnts/gns/mht; < 1 starts small for sbc)."
        },
    )
    # ---- data bounds (the LR and threshold schedules use them as their horizon)
    gqc_microbatch_budget: int = field(
        default=0,
        metadata={"help": "Stop after this many microbatches (per rank); 0 = bounded by --num_train_epochs."},
    )
    gqc_token_budget: int = field(
        default=0,
        metadata={"help": "Stop after this many input tokens (all ranks); 0 = no token bound."},
    )
    # ---- controller-specific
    gqc_mht_confidence: float = field(
        default=0.95, metadata={"help": "mht: confidence level of the loss t-interval (0 < x < 1)."}
    )
    gqc_mht_beta: float = field(
        default=0.01, metadata={"help": "mht: update weight of the running loss mean (0 < x <= 1)."}
    )
    gqc_gns_ema: float = field(
        default=1.0,
        metadata={
            "help": "gns_sample: weight of the current window in the tr(Sigma) and |G|^2 estimates "
            "(0 < x <= 1); below 1 blends in an EMA of the previous windows' estimates. 1.0: the window alone."
        },
    )
    gqc_sample_norm_every: int = field(
        default=1,
        metadata={
            "help": "gns_sample: capture per-sample gradient norms on every N-th training microbatch only "
            "(counted over the run; >= 1). Other microbatches run without hooks and reuse the last measured "
            "mean per-sample squared norm, with their own sample count, token weights and window norm "
            "(docs/gqc.md). Cuts the capture cost about N-fold; 1: measure every microbatch."
        },
    )
    gqc_sample_norm_layers: str = field(
        default="all",
        metadata={
            "help": "gns_sample: which modules' per-sample gradient norms give the noise scale (all|attn|mlp|"
            "embed|norm or a module-name regex, comma-separated); the window's gradient norm is then taken "
            "over the same parameters. 'norm' (LayerNorm/RMSNorm only) costs a fraction of 'all' "
            "(docs/gqc.md). Default all: every trainable parameter."
        },
    )
    # ---- LR coupled to the window size (docs/gqc.md, hf_gradext/gqc/lr_coupling.py)
    gqc_lr_coupling: str = field(
        default="none",
        metadata={
            "help": "Scale each step's LR by the window size k it closes: sqrt -> lr x sqrt(k/k0), linear -> "
            "lr x k/k0 (k0: --gqc_lr_coupling_k0). 'none' keeps the scheduler's LR.",
            "choices": list(GQC_LR_COUPLINGS),
        },
    )
    gqc_lr_coupling_k0: int = field(
        default=0,
        metadata={
            "help": "Reference window size (microbatches) of --gqc_lr_coupling; 0 = the run's first window."
        },
    )

    def _validate_lr_coupling(self) -> None:
        """``--gqc_lr_coupling`` and ``--gqc seesaw``: what scales a step's LR, and what it needs."""
        if self.gqc_lr_coupling not in GQC_LR_COUPLINGS:
            raise UserFacingError(
                f"--gqc_lr_coupling {self.gqc_lr_coupling!r} is unknown; choose one of {', '.join(GQC_LR_COUPLINGS)}"
            )
        if self.gqc_lr_coupling != "none" and self.gqc in ("none", "seesaw"):
            raise UserFacingError(
                f"--gqc_lr_coupling {self.gqc_lr_coupling} needs an adaptive --gqc controller (seesaw sets its "
                "own LR; fixed accumulation: scale --learning_rate instead); drop it or pick gnts/sbc/gns/gns_sample/mht"
            )
        if self.gqc != "seesaw":
            return
        k0 = self.gqc_threshold_start
        if not (float(k0).is_integer() and 1 <= k0 <= self.gqc_max_microbatches):
            raise UserFacingError(
                f"--gqc seesaw reads --gqc_threshold_start as the first window's size in microbatches; "
                f"set an integer in [1, --gqc_max_microbatches {self.gqc_max_microbatches}], got {k0}"
            )
        if getattr(self, "lr_scheduler_type", None) in METRIC_SCHEDULERS:
            raise UserFacingError(
                f"--gqc seesaw doubles the window where the LR schedule halves; --lr_scheduler_type "
                f"{self.lr_scheduler_type} has no schedule over data: use cosine, linear, ..."
            )

    def _validate_gqc(self) -> None:
        if self.gqc not in GQC_CONTROLLERS:
            raise UserFacingError(
                f"--gqc {self.gqc!r} is unknown; choose one of {', '.join(GQC_CONTROLLERS)}"
            )
        if self.gqc_threshold_end is None:
            self.gqc_threshold_end = self.gqc_threshold_start
        # Ranges first, with --gqc none too: a value outside its range is a mistake whether or not it is used.
        check_ranges(self, GQC_RANGES)
        self._validate_lr_coupling()
        if self.gqc_sample_norm_every != 1 and self.gqc != "gns_sample":
            raise UserFacingError(
                f"--gqc_sample_norm_every {self.gqc_sample_norm_every} applies to --gqc gns_sample only "
                f"(got --gqc {self.gqc}); drop it or use --gqc gns_sample"
            )
        layers = str(self.gqc_sample_norm_layers or "").strip(" ,")
        if not layers:
            raise UserFacingError(
                "--gqc_sample_norm_layers is empty; pass all|attn|mlp|embed|norm or a module-name regex"
            )
        if layers != "all" and self.gqc != "gns_sample":
            raise UserFacingError(
                f"--gqc_sample_norm_layers {layers} applies to --gqc gns_sample only "
                f"(got --gqc {self.gqc}); drop it or use --gqc gns_sample"
            )
        if self.gqc == "none":
            return
        if self.gqc_schedule not in GQC_SCHEDULES:
            raise UserFacingError(
                f"--gqc_schedule {self.gqc_schedule!r} is unknown; choose one of {', '.join(GQC_SCHEDULES)}"
            )
        if self.gqc_threshold_mode not in ("absolute", "relative"):
            raise UserFacingError("--gqc_threshold_mode must be 'absolute' or 'relative'")
        if self.gqc_threshold_mode == "relative" and self.gqc != "gnts":
            raise UserFacingError(
                "--gqc_threshold_mode relative applies to --gqc gnts only; drop it or use gnts"
            )
        if self.gqc == "sbc" and min(self.gqc_threshold_start, self.gqc_threshold_end) < 1:
            raise UserFacingError(
                "--gqc sbc reads --gqc_threshold_start/--gqc_threshold_end as a logical batch size in samples; "
                "set them >= 1"
            )
        # The controller decides when a window ends; a fixed window on top would be contradictory.
        if getattr(self, "gradient_accumulation_steps", 1) != 1:
            raise UserFacingError(
                f"--gradient_accumulation_steps {self.gradient_accumulation_steps} conflicts with --gqc {self.gqc} "
                "(the controller sizes each window); leave it at 1 and use --gqc_max_microbatches as the cap"
            )
        # A GradScaler would scale the tested norm by the loss scale and skip steps on its own; refuse.
        if getattr(self, "fp16", False):
            raise UserFacingError(
                f"--fp16 is not supported with --gqc {self.gqc} (loss scaling would distort the tested "
                "gradient norm); use --bf16 or fp32"
            )
        # Backends the GQC loop cannot drive, refused before any model or data is loaded: the flags and
        # the launcher's environment (accelerate launch exports these switches). GradExtTrainer checks
        # the accelerator it builds as well (hf_gradext.gqc.run.check_supported).
        if getattr(self, "deepspeed", None) or _env_flag("ACCELERATE_USE_DEEPSPEED"):
            raise UserFacingError(DEEPSPEED_REFUSAL.format(gqc=self.gqc))
        if getattr(self, "fsdp", None) or _env_flag("ACCELERATE_USE_FSDP"):
            raise UserFacingError(FSDP_REFUSAL.format(gqc=self.gqc))
