"""Command line -> ``GradExtArguments``: ``--config run.yaml`` sets defaults, flags override it.

Precedence, lowest first: dataclass defaults < the embedded-default profile (only when the run has
no model and no data source) < the YAML file < command-line flags. YAML keys are flag names without
dashes; they are turned into flags and parsed by the same ``HfArgumentParser`` so types and
``choices`` are checked identically. Every parse problem raises
:class:`~hf_gradext.errors.UserFacingError` (one line) instead of printing argparse's full usage.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
from typing import Any, NoReturn

from transformers import HfArgumentParser

from hf_gradext.arguments import GradExtArguments
from hf_gradext.errors import UserFacingError

# Applied (as defaults, below YAML and flags) when the run uses neither a model nor a data source,
# i.e. the tiny GPT-2 on the embedded corpus. Tuned to finish in < 3 minutes on 2 CPU cores.
EMBEDDED_DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/tiny-default",
    "config_name": "tiny",
    "block_size": 128,
    "num_train_epochs": 2,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "learning_rate": 3e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "weight_decay": 0.1,
    "logging_steps": 10,
    "logging_first_step": True,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "report_to": "none",
    "seed": 42,
}
DATA_OR_MODEL_FLAGS = ("model_name_or_path", "dataset_name", "train_file")


class _Parser(HfArgumentParser):
    """``HfArgumentParser`` whose errors are one-line ``UserFacingError`` s instead of a usage wall."""

    def error(self, message: str) -> NoReturn:
        raise UserFacingError(f"{message}; run with --help for the list of flags")


def _help_groups() -> list[tuple[str, type]]:
    """``--help`` sections in the order a user looks for them: each of hf_gradext's feature mixins."""
    from hf_gradext.arguments.collection import CollectionArguments
    from hf_gradext.arguments.gqc import GQCArguments
    from hf_gradext.arguments.model import ModelDataArguments
    from hf_gradext.arguments.patches import PatchesArguments
    from hf_gradext.arguments.projection import ProjectionArguments

    return [
        ("model and data", ModelDataArguments),
        ("gradient quality control (GQC)", GQCArguments),
        ("per-sample gradient collection", CollectionArguments),
        ("gradient projection", ProjectionArguments),
        ("GPT-2 patches", PatchesArguments),
    ]


def _group_help_by_feature(parser: argparse.ArgumentParser, config_action: argparse.Action) -> None:
    """Regroup the flat option list: run config (``--config``, ``--help``) first, then each feature's
    flags, then HF's ``TrainingArguments`` (argparse prints groups in creation order; moving an action
    between groups only changes where ``--help`` lists it, not how it parses)."""
    from dataclasses import fields

    flat = parser._optionals  # the one group HfArgumentParser put everything in
    by_dest = {a.dest: a for a in flat._group_actions}
    run = parser.add_argument_group("run config")
    sections = [(run, [by_dest.get("help"), config_action])]
    for title, mixin in _help_groups():
        group = parser.add_argument_group(title)
        sections.append((group, [by_dest.get(f.name) for f in fields(mixin)]))
    moved: set[int] = set()
    for group, actions in sections:
        for action in actions:
            if action is not None and id(action) not in moved:
                group._group_actions.append(action)
                moved.add(id(action))
    flat._group_actions[:] = [a for a in flat._group_actions if id(a) not in moved]
    flat.title = "HF TrainingArguments (see transformers' docs)"
    # Print the feature groups before HF's: argparse keeps groups in a list, in creation order.
    parser._action_groups.remove(flat)
    parser._action_groups.append(flat)


def build_parser(prog: str = "hf-gradext train") -> HfArgumentParser:
    """The ``HfArgumentParser`` over ``GradExtArguments`` (plus ``--config``), help grouped by feature."""
    # A one-line usage: argparse's default lists all ~180 flags before the first section.
    usage = "%(prog)s [--config RUN.yaml] [--FLAG VALUE ...]  (flags grouped by feature below)"
    parser = _Parser(GradExtArguments, prog=prog, allow_abbrev=False, usage=usage)
    config_action = parser.add_argument(
        "--config",
        metavar="RUN.yaml",
        default=None,
        help="YAML file whose keys (flag names) set defaults; command-line flags override them.",
    )
    _group_help_by_feature(parser, config_action)
    return parser


def _flag_tokens(key: str, value: Any) -> list[str]:
    """One YAML entry -> argv tokens (``None`` means 'leave the default')."""
    if value is None:
        return []
    flag = f"--{key}"
    if isinstance(value, bool):
        return [flag, str(value).lower()]
    if isinstance(value, (list, tuple)):
        return [flag, *[str(v) for v in value]] if value else []
    if isinstance(value, dict):
        return [flag, json.dumps(value)]
    return [flag, str(value)]


def _known_dests(parser: HfArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if a.dest != "help"}


def _yaml_tokens(path: str, parser: HfArgumentParser) -> list[str]:
    import yaml

    if not os.path.isfile(path):
        raise UserFacingError(f"--config {path!r} does not exist; pass the path of a YAML run config")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise UserFacingError(f"--config {path!r} is not valid YAML{where}; fix the syntax") from exc
    if not isinstance(data, dict):
        raise UserFacingError(f"--config {path!r} must be a mapping of flag names to values")
    known = _known_dests(parser)
    tokens: list[str] = []
    for key, value in data.items():
        key = str(key).lstrip("-").replace("-", "_")
        if key == "config" or key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserFacingError(f"--config {path!r}: unknown key {key!r}{hint}; remove or rename it")
        tokens += _flag_tokens(key, value)
    return tokens


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "accelerator") and torch.accelerator.is_available())


def _launched_without_accelerator() -> bool:
    """True under a multi-process launcher (torchrun / accelerate) on a machine with no accelerator."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator()


def _mentions(tokens: list[str], dest: str) -> bool:
    flags = {f"--{dest}", f"--{dest.replace('_', '-')}"}
    return any(t in flags or t.split("=", 1)[0] in flags for t in tokens)


def parse_args(argv: list[str] | None = None) -> GradExtArguments:
    """Parse ``hf-gradext train`` arguments into a validated ``GradExtArguments``.

    Raises:
        UserFacingError: unknown flag, invalid value/enum, bad YAML, or an invalid flag combination.
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    pre.error = parser.error  # type: ignore[method-assign]
    ns, rest = pre.parse_known_args(argv)
    tokens = _yaml_tokens(ns.config, parser) if ns.config else []
    tokens += rest
    if not any(_mentions(tokens, d) for d in DATA_OR_MODEL_FLAGS):
        profile: list[str] = []
        for key, value in EMBEDDED_DEFAULTS.items():
            profile += _flag_tokens(key, value)
        tokens = profile + tokens
    if _launched_without_accelerator():
        # accelerate's MULTI_CPU type needs mpirun; recipes/accelerate/cpu_ddp.yaml uses its torchrun
        # launcher instead, and the processes must then be told to use the CPU (gloo) themselves.
        tokens = ["--use_cpu", "true", *tokens]
    if not _mentions(tokens, "dataloader_pin_memory") and not _has_accelerator():
        # Pinned host memory only helps copies to an accelerator; without one torch warns on every loader.
        tokens = ["--dataloader_pin_memory", "false", *tokens]
    unknown = [
        t for t in tokens if t.startswith("--") and t.split("=", 1)[0] not in parser._option_string_actions
    ]
    if unknown:
        flag = unknown[0].split("=", 1)[0]
        close = difflib.get_close_matches(flag, list(parser._option_string_actions), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserFacingError(f"unknown flag {flag}{hint}; run with --help for the list of flags")
    try:
        (args,) = parser.parse_args_into_dataclasses(args=tokens, look_for_args_file=False)[:1]
    except UserFacingError:
        raise
    except (ValueError, TypeError, ImportError) as exc:
        # TrainingArguments.__post_init__ raises plain ValueErrors; keep their first line only.
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserFacingError(first) from exc
    return args
