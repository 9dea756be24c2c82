"""``hf-gradext project | full-grads | attribute``: argument parsing and entry points.

Each ``*_main(argv) -> int`` prints ``error: <one line>`` and returns 2 on bad input.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from transformers import HfArgumentParser

from hf_gradext.arguments.model import ModelDataArguments
from hf_gradext.arguments.projection import ProjectionArguments, optimizer_state_file
from hf_gradext.arguments.ranges import SEED_MAX
from hf_gradext.devices import check_device
from hf_gradext.errors import UserFacingError
from hf_gradext.process_group import end_process_group
from hf_gradext.projection.dataset_pass import ProjectRunArguments


class _Parser(HfArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UserFacingError(f"{message}; run with --help for the list of flags")


def _guard(fn: Callable[[], Any]) -> int:
    try:
        fn()
        end_process_group()  # under accelerate launch; a no-op in one process
    except UserFacingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _parse(types: tuple, argv: list[str] | None, prog: str) -> tuple:
    parser = _Parser(types, prog=prog, allow_abbrev=False)
    return parser.parse_args_into_dataclasses(args=list(sys.argv[1:] if argv is None else argv))


def project_main(argv: list[str] | None = None) -> int:
    """``hf-gradext project``: model/data flags as in ``train``, projection flags, run flags."""

    def run() -> None:
        from hf_gradext.projection.dataset_pass import run_projection

        margs, pargs, rargs = _parse(
            (ModelDataArguments, ProjectionArguments, ProjectRunArguments), argv, "hf-gradext project"
        )
        margs._validate_model_data()
        pargs._validate_projection()
        rargs._validate_run()
        if pargs.proj_output_dir:  # accept the training flag name too
            rargs.output_dir = pargs.proj_output_dir
        stats = run_projection(margs, pargs, rargs)
        if stats.get("per_rank") is not None:
            print(
                f"projected {stats['examples_this_run']} examples ({stats['skipped_already_done']} already done) "
                f"into {rargs.output_dir}: {stats['tokens_per_second']:.0f} tokens/s, "
                f"mean loss {stats['mean_batch_loss']:.4f}"
            )

    return _guard(run)


@dataclass
class FullGradsArguments:
    output_dir: str = field(default="fullgrads", metadata={"help": "Where exact-gradient shards go."})
    max_samples: int | None = field(
        default=None, metadata={"help": "Number of examples (required: exact gradients are large)."}
    )
    batch_size: int = field(default=1, metadata={"help": "Examples per forward+backward."})
    layers: str = field(
        default="all",
        metadata={
            "help": "Parameters to store: 'all', a layer selection, or 'projected' (needs --proj_metadata)."
        },
    )
    proj_metadata: str | None = field(
        default=None, metadata={"help": "metadata.json (or its directory) whose projected weights to store."}
    )
    split: str = field(default="train", metadata={"help": "Split.", "choices": ["train", "validation"]})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, ..."})
    grad_dtype: str = field(
        default="float32",
        metadata={"help": "dtype of the math and the stored gradients.", "choices": ["float32", "float64"]},
    )
    seed: int = field(
        default=42, metadata={"help": "Seed for a from-scratch model (use the projection run's)."}
    )
    max_elements: int = field(
        default=2_000_000_000,
        metadata={"help": "Refuse when max_samples x parameters exceeds this (disk guard)."},
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Remove the gradient shards and metadata an earlier run left in --output_dir (logged) and "
            "start over."
        },
    )
    resume: bool = field(
        default=False,
        metadata={
            "help": "Continue the run that wrote --output_dir: skip the examples already there. Refused unless "
            "the model weights and the settings (stored parameters, dtype, data) are that run's. Without "
            "--resume or --overwrite a directory holding gradient shards is refused."
        },
    )
    proj_precondition: str | None = field(
        default=None,
        metadata={
            "help": "Store Adam-preconditioned gradients s**p * g, with the exact elementwise scale "
            "s = 1 / (sqrt(v_hat) + eps) of a finished run's optimizer state: a checkpoint directory holding "
            "optimizer.pt, the file itself, or a run's output_dir (newest checkpoint-N with one). The "
            "reference for `project --proj_precondition`. See docs/preconditioning.md."
        },
    )
    proj_precondition_power: float = field(
        default=1.0, metadata={"help": "Exponent p of the scale (as in `project`); must be > 0."}
    )


def full_grads_main(argv: list[str] | None = None) -> int:
    """``hf-gradext full-grads``: exact per-sample gradients for a bounded number of examples."""

    def run() -> None:
        from hf_gradext.projection.full_grads import run_full_grads

        margs, fargs = _parse((ModelDataArguments, FullGradsArguments), argv, "hf-gradext full-grads")
        margs._validate_model_data()
        if fargs.max_samples is None or fargs.max_samples < 1:
            raise UserFacingError(
                "--max_samples is required (a positive number): exact gradients are model-sized"
            )
        if fargs.layers == "projected" and not fargs.proj_metadata:
            raise UserFacingError("--layers projected needs --proj_metadata DIR/metadata.json")
        if fargs.overwrite and fargs.resume:
            raise UserFacingError("--overwrite and --resume exclude each other; pass one of them")
        if fargs.batch_size < 1 or fargs.max_elements < 1:
            raise UserFacingError("--batch_size and --max_elements must be >= 1")
        if not 0 <= fargs.seed <= SEED_MAX:
            raise UserFacingError(f"--seed={fargs.seed} must be in [0, {SEED_MAX}]")
        if not fargs.proj_precondition_power > 0:  # NaN fails too
            raise UserFacingError(
                f"--proj_precondition_power={fargs.proj_precondition_power} must be > 0 (1 = Adam's update)"
            )
        if fargs.proj_precondition is not None:
            optimizer_state_file(fargs.proj_precondition)  # a bad path fails before the model loads
        check_device(fargs.device)
        out = run_full_grads(margs, fargs)
        print(
            f"wrote exact gradients of {out['written']} examples ({out['skipped_already_done']} already done, "
            f"{out['total_param_dim']} values each) to {fargs.output_dir}"
        )

    return _guard(run)


@dataclass
class AttributeArguments:
    train: str = field(default=None, metadata={"help": "Projection directory of the training set."})
    query: str = field(default=None, metadata={"help": "Projection directory of the query examples."})
    top_k: int = field(default=10, metadata={"help": "Training examples to report per query."})
    kind: str = field(default="cosine", metadata={"help": "Score.", "choices": ["cosine", "dot"]})
    damping: float | None = field(
        default=None,
        metadata={
            "help": "Precondition with (F + damping * mean eigenvalue * I)^-1, F the training rows' "
            "second moment (TRAK/influence style). Unset: no preconditioner."
        },
    )
    output: str = field(
        default="attribution", metadata={"help": "Output path prefix: writes PREFIX.json and PREFIX.csv."}
    )
    max_queries: int | None = field(default=None, metadata={"help": "Use only the first N query examples."})


def attribute_main(argv: list[str] | None = None) -> int:
    """``hf-gradext attribute --train DIR --query DIR --top_k K``."""

    def run() -> None:
        from hf_gradext.projection.attribution import run_attribution

        (aargs,) = _parse((AttributeArguments,), argv, "hf-gradext attribute")
        if not aargs.train or not aargs.query:
            raise UserFacingError("--train and --query are required (projection directories)")
        if aargs.top_k < 1:
            raise UserFacingError(f"--top_k={aargs.top_k} must be >= 1")
        if aargs.max_queries is not None and aargs.max_queries < 1:
            raise UserFacingError(f"--max_queries={aargs.max_queries} must be >= 1 (or unset for all)")
        if aargs.damping is not None and not aargs.damping > 0:
            raise UserFacingError(f"--damping={aargs.damping} must be > 0 (or unset for no preconditioner)")
        paths = run_attribution(aargs)
        print("wrote " + ", ".join(str(p) for p in paths))

    return _guard(run)
