"""Gradient projection flags (``--project_gradients`` during training; also read by ``hf-gradext project``).

See docs/projection.md for the projection itself (Kronecker factors, seeds, the k_i x k_o rule).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from hf_gradext.arguments.ranges import SEED_MAX, Range, check_ranges
from hf_gradext.errors import UserFacingError

PROJ_DTYPES = ("bfloat16", "float16", "float32")
PROJ_METHODS = ("gaussian", "rademacher", "row_orthonormal")  # hf_gradext.projection.matrices.METHODS
PROJ_SPLITS = ("cost", "balanced")  # hf_gradext.projection.ranks.SPLIT_RULES
# What an unset --proj_method means (its default is None so that --proj_row_orthonormal can be told apart).
DEFAULT_PROJ_METHOD = "rademacher"
PRECONDITION_MODES = ("rank1", "adafactor")  # the factored modes; full-grads always scales exactly


@dataclass
class ProjectionArguments:
    project_gradients: bool = field(
        default=False,
        metadata={
            "help": "Project every training example's gradient (Kronecker, LoRA-style) from the training "
            "backward itself and store the rows in shards under --proj_output_dir."
        },
    )
    proj_layers: str = field(
        default="mlp,attn",
        metadata={
            "help": "Layers to project: groups (mlp, attn, all), comma lists, module-name patterns or regexes "
            "(e.g. 'mlp.c_fc', 'transformer.h.0'). Biases are not projected."
        },
    )
    proj_rank_total: int = field(
        default=256,
        metadata={
            "help": "Target projection dimension PER LAYER (k_i * k_o as close to it as possible); a row has "
            "about this times the number of projected layers entries."
        },
    )
    proj_rank_min: int = field(
        default=8, metadata={"help": "Lower bound for each Kronecker factor k_i and k_o."}
    )
    proj_seed: int = field(
        default=42,
        metadata={"help": "Seed of the projection matrices (per layer: sha256 of seed and layer name)."},
    )
    proj_dtype: str = field(
        default="bfloat16",
        metadata={"help": "dtype the projected rows are stored in.", "choices": list(PROJ_DTYPES)},
    )
    proj_method: str | None = field(
        default=None,
        metadata={
            "help": "Distribution of the Kronecker factors: rademacher (+-1/sqrt(k) entries; the default: the lowest "
            "variance of projected dot products), gaussian (N(0, 1/k) entries; the default before 0.2) or "
            "row_orthonormal (orthonormal rows rescaled by sqrt(d/k)). All give unbiased dot products in "
            "expectation; docs/projection.md compares them (LDS).",
            "choices": list(PROJ_METHODS),
        },
    )
    proj_split: str = field(
        default="balanced",
        metadata={
            "help": "How --proj_rank_total is split into k_i x k_o per layer: balanced (the square-most split: a "
            "sketch of rank min(k_i, k_o) keeps more of each gradient) or cost (the fewest multiply-adds; the "
            "default before 0.2).",
            "choices": list(PROJ_SPLITS),
        },
    )
    proj_row_orthonormal: bool = field(
        default=False,
        metadata={"help": "Same as --proj_method row_orthonormal (kept for existing command lines)."},
    )
    include_embeddings: bool = field(
        default=False,
        metadata={
            "help": "Also project the token/position embeddings (sparse: only looked-up rows; a tied lm_head "
            "adds its contribution to the token embedding's block)."
        },
    )
    proj_save_interval: int = field(
        default=1,
        metadata={"help": "Batches per shard: rows are buffered and written together, never dropped."},
    )
    proj_output_dir: str | None = field(
        default=None,
        metadata={"help": "Where projection shards and metadata go. Default: <output_dir>/projections."},
    )

    proj_precondition: str | None = field(
        default=None,
        metadata={
            "help": "Adam-precondition the gradients (LESS-style) with the second moments of a finished "
            "run: a Trainer checkpoint directory holding optimizer.pt, or a run's output_dir (its newest "
            "checkpoint-N with an optimizer.pt is used). Unset: plain gradients. See docs/preconditioning.md."
        },
    )
    proj_precondition_mode: str = field(
        default="rank1",
        metadata={
            "help": "How the elementwise Adam scale is folded into the Kronecker factors: rank1 (top singular "
            "pair of the scale) or adafactor (row/column sums of v_hat). full-grads scales exactly.",
            "choices": list(PRECONDITION_MODES),
        },
    )
    proj_precondition_power: float = field(
        default=1.0,
        metadata={
            "help": "Exponent p of Adam's scale s = 1 / (sqrt(v_hat) + eps): rows are s**p * g. 1 = Adam's "
            "update (v_hat ** -0.5); 0.5 on train and query rows gives the dot product g_q . s . g_i."
        },
    )

    def _validate_precondition(self) -> None:
        if self.proj_precondition_mode not in PRECONDITION_MODES:
            raise UserFacingError(
                f"--proj_precondition_mode={self.proj_precondition_mode!r} is not supported; choose one of "
                f"{', '.join(PRECONDITION_MODES)}"
            )
        check_ranges(self, {"proj_precondition_power": Range(low=0, low_open=True)})  # NaN fails too
        if self.proj_precondition is not None:
            optimizer_state_file(self.proj_precondition)  # a bad path fails at parse time

    def _validate_projection(self) -> None:
        self._validate_precondition()
        if self.project_gradients and self.proj_precondition is not None:
            # During training the second moments change every step; LESS preconditions with the state of a
            # finished run, which is what `hf-gradext project` does.
            raise UserFacingError(
                "--proj_precondition cannot be combined with --project_gradients (the optimizer state changes "
                "during training); train first, then run `hf-gradext project --proj_precondition <checkpoint>`"
            )
        if self.proj_method is not None and self.proj_method not in PROJ_METHODS:
            raise UserFacingError(
                f"--proj_method={self.proj_method!r} is not supported; choose one of {', '.join(PROJ_METHODS)}"
            )
        if self.proj_split not in PROJ_SPLITS:
            raise UserFacingError(
                f"--proj_split={self.proj_split!r} is not supported; choose one of {', '.join(PROJ_SPLITS)}"
            )
        if self.proj_row_orthonormal:
            if self.proj_method not in (None, "row_orthonormal"):
                raise UserFacingError(
                    f"--proj_row_orthonormal contradicts --proj_method {self.proj_method}; pass only one of them"
                )
            self.proj_method = "row_orthonormal"
        elif self.proj_method is None:
            self.proj_method = DEFAULT_PROJ_METHOD
        if self.proj_dtype not in PROJ_DTYPES:
            raise UserFacingError(
                f"--proj_dtype={self.proj_dtype!r} is not supported; choose one of {', '.join(PROJ_DTYPES)}"
            )
        if self.proj_rank_min < 1:
            raise UserFacingError(
                f"--proj_rank_min={self.proj_rank_min} must be >= 1; pass a positive integer"
            )
        if self.proj_rank_total < self.proj_rank_min**2:
            raise UserFacingError(
                f"--proj_rank_total={self.proj_rank_total} is below --proj_rank_min squared "
                f"({self.proj_rank_min**2}); raise --proj_rank_total or lower --proj_rank_min"
            )
        if not 0 <= self.proj_seed <= SEED_MAX:
            raise UserFacingError(f"--proj_seed={self.proj_seed} must be in [0, {SEED_MAX}]")
        if self.proj_save_interval < 1:
            raise UserFacingError(
                f"--proj_save_interval={self.proj_save_interval} must be >= 1 (batches per shard)"
            )
        if not self.proj_layers or not self.proj_layers.strip(" ,"):
            raise UserFacingError("--proj_layers is empty; pass e.g. 'mlp,attn' or a module-name pattern")
        for part in self.proj_layers.split(","):
            try:
                re.compile(part.strip())
            except re.error as exc:
                raise UserFacingError(
                    f"--proj_layers pattern {part.strip()!r} is not a valid regex ({exc}); fix or escape it"
                ) from None


def optimizer_state_file(path: str) -> Path:
    """The ``optimizer.pt`` that ``--proj_precondition`` names (checked without loading torch).

    ``path`` is a checkpoint directory (``checkpoint-N/optimizer.pt``), a run's output directory (its newest
    ``checkpoint-N`` that holds an ``optimizer.pt``), or the ``optimizer.pt`` file itself.
    """
    given = Path(path)
    if given.is_file():
        return given
    if not given.is_dir():
        raise UserFacingError(
            f"--proj_precondition {path}: no such file or directory; pass a Trainer checkpoint directory "
            "(checkpoint-N with optimizer.pt) or the output_dir of a finished run"
        )
    if (given / "optimizer.pt").is_file():
        return given / "optimizer.pt"
    numbered = [c for c in given.glob("checkpoint-*") if c.name.split("-", 1)[1].isdigit()]
    for candidate in sorted(numbered, key=lambda c: int(c.name.split("-", 1)[1]), reverse=True):
        if (candidate / "optimizer.pt").is_file():
            return candidate / "optimizer.pt"
    raise UserFacingError(
        f"--proj_precondition {path} holds no optimizer.pt (nor a checkpoint-N with one); pass a checkpoint "
        "saved with its optimizer state (not --save_only_model)"
    )
