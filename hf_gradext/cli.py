"""``hf-gradext`` command line: a thin dispatcher to one module per subcommand.

Each entry is "module:function"; the function takes ``argv: list[str]`` and returns an exit code.
Modules are imported only when their subcommand runs, and ``import hf_gradext`` skips torch and
transformers for ``hf-gradext``, ``--help`` and ``--version`` (see :mod:`hf_gradext`), so those answer
without loading either (``recipes/benchmarks/bench_cli_startup.py`` measures it).
"""

from __future__ import annotations

import importlib
import sys

from hf_gradext.errors import UserFacingError

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "hf_gradext.train:main",
        "train or fine-tune a causal LM (GQC, collection, projection, patches)",
    ),
    "project": ("hf_gradext.projection.cli:project_main", "project per-sample gradients of a dataset"),
    "full-grads": (
        "hf_gradext.projection.cli:full_grads_main",
        "exact per-sample gradients for a few samples",
    ),
    "attribute": ("hf_gradext.projection.cli:attribute_main", "top-k training examples for query examples"),
    "analyze": ("hf_gradext.analysis.cli:main", "analyze gradients | gqc | projection-error"),
}


def _usage() -> str:
    lines = ["usage: hf-gradext [--version] <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {desc}" for name, (_, desc) in SUBCOMMANDS.items()]
    lines += ["", "Run `hf-gradext <command> --help` for the options of one command."]
    return "\n".join(lines)


def run_entry(spec: str, argv: list[str]) -> int:
    module_name, func_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"error: `{spec}` is not available in this version of hf_gradext", file=sys.stderr)
            return 2
        raise
    try:
        return int(getattr(module, func_name)(argv) or 0)
    except UserFacingError as exc:
        # Subcommands may raise instead of returning 2: one line, no traceback, either way.
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from hf_gradext import __version__

        print(f"hf-gradext {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"error: unknown command {command!r}; choose one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    return run_entry(SUBCOMMANDS[command][0], rest)


if __name__ == "__main__":
    sys.exit(main())
