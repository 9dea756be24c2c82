"""Gradient projection flags (``--project_gradients`` during training; also read by ``hf-gradext project``).

See docs/projection.md for the projection itself (Kronecker factors, seeds, the k_i x k_o rule).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hf_gradext.arguments.ranges import SEED_MAX
from hf_gradext.errors import UserFacingError

PROJ_DTYPES = ("bfloat16", "float16", "float32")


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
    proj_row_orthonormal: bool = field(
        default=False,
        metadata={
            "help": "Row-orthonormal factors (rescaled by sqrt(d/k)) instead of Gaussian ones; both give "
            "unbiased dot products in expectation."
        },
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

    def _validate_projection(self) -> None:
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
