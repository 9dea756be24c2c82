"""Regenerate the README's flags reference from the ``GradExtArguments`` dataclass fields.

Usage:
    python recipes/make_flags_table.py            # print the table
    python recipes/make_flags_table.py --write    # replace the block between the markers in README.md
    python recipes/make_flags_table.py --check    # exit 1 if README.md is stale (for CI or a pre-commit hook)

Only the flags hf_gradext adds are listed (HF's TrainingArguments flags: `hf-gradext train --help`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from transformers import TrainingArguments

from hf_gradext.arguments import GradExtArguments

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- flags:start -->", "<!-- flags:end -->"


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return "" if field.default is None else f"`{field.default}`"
    if field.default_factory is not dataclasses.MISSING:
        return f"`{field.default_factory()}`"
    return "required"


def flags_table() -> str:
    """A markdown table: one row per field GradExtArguments adds to TrainingArguments, grouped by mixin."""
    hf = {f.name for f in dataclasses.fields(TrainingArguments)}
    rows = ["| flag | default | choices | help |", "|---|---|---|---|"]
    for base in GradExtArguments.__mro__[1:]:
        if (
            base is TrainingArguments
            or not dataclasses.is_dataclass(base)
            or base.__module__.startswith("transformers")
        ):
            continue
        own = [
            f
            for f in dataclasses.fields(base)
            if f.name not in hf and f.name in base.__dict__.get("__annotations__", {})
        ]
        if not own:
            continue
        rows.append(f"| **{base.__name__}** | | | |")
        for f in own:
            choices = ", ".join(str(c) for c in f.metadata.get("choices", []))
            text = " ".join(str(f.metadata.get("help", "")).split()).replace("|", "\\|")
            rows.append(f"| `--{f.name}` | {_default(f)} | {choices} | {text} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update README.md in place")
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md's table is stale")
    opts = parser.parse_args(argv)
    table = flags_table()
    if not (opts.write or opts.check):
        print(table, end="")
        return 0
    text = README.read_text(encoding="utf-8")
    if START not in text or END not in text:
        print(f"error: README.md has no {START} ... {END} block; add the markers first", file=sys.stderr)
        return 2
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{table}{END}{tail}"
    if opts.check:
        if new != text:
            print(
                "error: README.md flags table is stale; run python recipes/make_flags_table.py --write",
                file=sys.stderr,
            )
            return 1
        return 0
    tmp = README.with_suffix(".md.tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(README)
    return 0


if __name__ == "__main__":
    sys.exit(main())
