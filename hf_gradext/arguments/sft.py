"""``GradExtSFTConfig``: hf_gradext's feature flags on top of TRL's ``SFTConfig``.

Why a config of its own: ``SFTTrainer`` turns any ``TrainingArguments`` that is no ``SFTConfig`` into one
through ``to_dict()``, which would drop (or, for ``GradExtArguments``, choke on) every hf_gradext flag.
So the feature mixins (GQC, gradient collection, projection, patches/throughput) sit over ``SFTConfig``
here, validated exactly as in ``GradExtArguments``. The model/data mixin is left out: it serves
``hf-gradext train`` (TRL has its own ``ModelConfig`` / ``ScriptArguments``), and its
``trust_remote_code`` would clash with ``SFTConfig``'s.

Importing this module imports trl; ``import hf_gradext`` does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trl import SFTConfig

from hf_gradext.arguments.collection import CollectionArguments
from hf_gradext.arguments.gqc import GQCArguments
from hf_gradext.arguments.patches import PatchesArguments
from hf_gradext.arguments.projection import ProjectionArguments
from hf_gradext.arguments.ranges import check_training_ranges
from hf_gradext.errors import UserFacingError


def per_sample_flags(args: Any) -> list[str]:
    """The per-sample consumers ``args`` switches on (``--collect_gradients``, ``--project_gradients``)."""
    return [f"--{flag}" for flag in ("collect_gradients", "project_gradients") if getattr(args, flag, False)]


def refuse_packed_rows(args: Any) -> None:
    """Refuse packing / padding-free while a per-sample consumer is on.

    Both put several examples into one batch row (packing: ``max_length`` chunks of concatenated
    examples; padding-free: the whole batch flattened into one row), so a "per-sample" gradient would be
    the gradient of a mix of examples and its example id could name only one of them.
    """
    flags = per_sample_flags(args)
    if not flags:
        return
    needs = f"{' and '.join(flags)} need{'s' if len(flags) == 1 else ''} one example per batch row"
    if getattr(args, "packing", False):
        raise UserFacingError(
            f"{needs}, but packing=True concatenates several examples per row; set packing=False"
        )
    if getattr(args, "padding_free", False):
        raise UserFacingError(
            f"{needs}, but padding_free=True flattens the batch into one row; set padding_free=False"
        )


def explicit_patch_flags(args: Any) -> list[str]:
    """The GPT-2 patch flags ``args`` sets explicitly (``--gpt2_causal_mask_cache`` unset is no request)."""
    flags = [f"--{f}" for f in ("gpt2_rms_norm", "gpt2_swiglu") if getattr(args, f, False)]
    if getattr(args, "gpt2_causal_mask_cache", None) is True:
        flags.append("--gpt2_causal_mask_cache")
    return flags


@dataclass
class GradExtSFTConfig(
    GQCArguments,
    CollectionArguments,
    ProjectionArguments,
    PatchesArguments,
    SFTConfig,
):
    """TRL's ``SFTConfig`` plus hf_gradext's GQC, gradient-collection, projection and patch flags.

    Use it with :class:`hf_gradext.trainer.GradExtSFTTrainer`; ``HfArgumentParser(GradExtSFTConfig)`` gives
    the same flags on the command line. TRL's defaults are kept (``bf16`` on unless ``fp16``,
    ``gradient_checkpointing=True``, ``logging_steps=10``).
    """

    def __post_init__(self) -> None:
        # hf_gradext's checks first (as in GradExtArguments): cheap, and the clearer message.
        check_training_ranges(self)
        self._validate_gqc()
        self._validate_collection()
        self._validate_projection()
        self._validate_patches()
        refuse_packed_rows(self)
        super().__post_init__()


def resolve_sft_args(model: Any, args: Any) -> Any:
    """The config a ``GradExtSFTTrainer`` runs with, refusing one whose hf_gradext flags TRL would drop.

    ``None`` becomes ``GradExtSFTConfig`` with TRL's default output directory (``<model name>-SFT``). A
    plain ``SFTConfig`` / ``TrainingArguments`` carries no hf_gradext flag and is passed on as it is (every
    feature off); ``GradExtArguments`` is refused: ``SFTTrainer`` would rebuild it as an ``SFTConfig`` from
    ``to_dict()`` and fail on, or lose, its flags.
    """
    if args is None:
        name = (
            model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
        )
        return GradExtSFTConfig(f"{str(name).split('/')[-1]}-SFT")
    feature_mixins = (GQCArguments, CollectionArguments, ProjectionArguments, PatchesArguments)
    if isinstance(args, feature_mixins) and not isinstance(args, SFTConfig):
        raise UserFacingError(
            f"GradExtSFTTrainer got {type(args).__name__}, whose hf_gradext flags SFTTrainer would drop when it "
            "rebuilds the args as an SFTConfig; pass hf_gradext.arguments.sft.GradExtSFTConfig instead"
        )
    return args


__all__ = [
    "GradExtSFTConfig",
    "explicit_patch_flags",
    "per_sample_flags",
    "refuse_packed_rows",
    "resolve_sft_args",
]
