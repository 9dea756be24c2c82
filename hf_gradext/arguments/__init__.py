"""``GradExtArguments``: every flag hf_gradext adds, on top of HF ``TrainingArguments``.

Each feature keeps its flags in its own mixin dataclass (one file per feature, all fields with
defaults and ``help``); this module composes them. Validation runs in ``__post_init__`` so that a
bad combination fails at parse time, before any model or data is loaded.
"""

from dataclasses import dataclass

from transformers import TrainingArguments

from hf_gradext.arguments.collection import CollectionArguments
from hf_gradext.arguments.gqc import GQCArguments
from hf_gradext.arguments.model import ModelDataArguments
from hf_gradext.arguments.patches import PatchesArguments
from hf_gradext.arguments.projection import ProjectionArguments
from hf_gradext.arguments.ranges import check_training_ranges


@dataclass
class GradExtArguments(
    ModelDataArguments,
    GQCArguments,
    CollectionArguments,
    ProjectionArguments,
    PatchesArguments,
    TrainingArguments,
):
    """``TrainingArguments`` plus hf_gradext's model/data, GQC, gradient-collection, projection and
    patch flags. Usable from Python (``GradExtArguments(output_dir=..., gqc="gnts")``) and from the
    command line through ``HfArgumentParser`` (see :func:`hf_gradext.cli`)."""

    def __post_init__(self) -> None:
        # Our own checks first: they are cheap and give the clearer message. HF's numeric flags are
        # range-checked here too (HF itself accepts --max_steps -3 and batch size 0).
        check_training_ranges(self)
        self._validate_model_data()
        self._validate_gqc()
        self._validate_collection()
        self._validate_projection()
        self._validate_patches()
        super().__post_init__()


__all__ = ["GradExtArguments"]
