"""Range checks for numeric flags, HF's own ``TrainingArguments`` ones included, at parse time.

HF accepts ``--max_steps -3`` (trains by epochs), turns ``--per_device_train_batch_size 0`` into a
traceback deep in the data loader, and lets NaN through every float flag. Each flag here gets its interval;
a value outside it fails when the arguments are parsed, in one line naming the flag, the value and the
allowed range. Comparisons are written so that NaN fails them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hf_gradext.errors import UserFacingError

SEED_MAX = 2**32 - 1  # numpy's seed range (transformers.set_seed seeds numpy too)


@dataclass(frozen=True)
class Range:
    """``low <= value <= high`` (``low_open`` / ``high_open``: strict); ``None`` allowed when ``optional``;
    ``also``: extra allowed values (e.g. ``-1`` for "unset")."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    also: tuple[float, ...] = ()

    def holds(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if value in self.also:
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            text = "a finite number"
        extras = [_num(v) for v in self.also] + (["unset"] if self.optional else [])
        return text + (f" (or {' / '.join(extras)})" if extras else "")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def check_ranges(obj: Any, ranges: dict[str, Range]) -> None:
    """Raise a one-line error for the first field of ``obj`` outside its range (fields it lacks are skipped)."""
    for name, allowed in ranges.items():
        if not hasattr(obj, name):
            continue
        value = getattr(obj, name)
        if not allowed.holds(value):
            raise UserFacingError(f"--{name} {value!r} is out of range: must be {allowed.describe()}")


POSITIVE_INT = Range(low=1)
NON_NEGATIVE = Range(low=0)
UNIT = Range(low=0, high=1, high_open=True)  # [0, 1)
SEED = Range(low=0, high=SEED_MAX)

# transformers' TrainingArguments: the numeric flags a run uses.
TRAINING_RANGES: dict[str, Range] = {
    "per_device_train_batch_size": POSITIVE_INT,
    "per_device_eval_batch_size": POSITIVE_INT,
    "gradient_accumulation_steps": POSITIVE_INT,
    "eval_accumulation_steps": Range(low=1, optional=True),
    "num_train_epochs": NON_NEGATIVE,
    "max_steps": Range(low=1, also=(-1,)),
    "learning_rate": NON_NEGATIVE,
    "weight_decay": NON_NEGATIVE,
    "adam_beta1": UNIT,
    "adam_beta2": UNIT,
    "adam_epsilon": NON_NEGATIVE,
    "max_grad_norm": NON_NEGATIVE,
    "warmup_steps": NON_NEGATIVE,
    "warmup_ratio": Range(low=0, high=1, optional=True),
    "label_smoothing_factor": UNIT,
    "neftune_noise_alpha": Range(low=0, optional=True),
    "torch_empty_cache_steps": Range(low=1, optional=True),
    "logging_steps": Range(low=0, low_open=True),
    "save_steps": Range(low=0, low_open=True),
    "eval_steps": Range(low=0, low_open=True, optional=True),
    "eval_delay": NON_NEGATIVE,
    "save_total_limit": Range(low=0, optional=True),
    "seed": SEED,
    "data_seed": Range(low=0, high=SEED_MAX, optional=True),
    "dataloader_num_workers": NON_NEGATIVE,
    "dataloader_prefetch_factor": Range(low=1, optional=True),
    "ddp_timeout": Range(low=1),
    "ddp_bucket_cap_mb": Range(low=1, optional=True),
}


def check_training_ranges(args: Any) -> None:
    """HF's numeric flags (:data:`TRAINING_RANGES`) plus the one rule between two of them."""
    check_ranges(args, TRAINING_RANGES)
    if getattr(args, "max_steps", -1) == -1 and getattr(args, "num_train_epochs", 1) == 0:
        raise UserFacingError(
            "--num_train_epochs 0 trains nothing; pass --num_train_epochs > 0 or --max_steps N"
        )
