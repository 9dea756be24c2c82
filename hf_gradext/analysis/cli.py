"""``hf-gradext analyze <what>``: dispatch to one analysis module per kind."""

from __future__ import annotations

import sys

from hf_gradext.cli import run_entry

ANALYSES: dict[str, tuple[str, str]] = {
    "gradients": (
        "hf_gradext.analysis.gradients_cli:main",
        "tables and plots of collected per-sample gradients",
    ),
    "gqc": ("hf_gradext.analysis.gqc_cli:main", "microbatches per step and norm vs threshold of a GQC run"),
    "projection-error": (
        "hf_gradext.analysis.projection_error_cli:main",
        "error of projected dot products / cosines vs dimension",
    ),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: hf-gradext analyze <kind> [options]\n\nkinds:")
        for name, (_, desc) in ANALYSES.items():
            print(f"  {name:<18} {desc}")
        return 0 if argv else 2
    if argv[0] not in ANALYSES:
        print(f"error: unknown analysis {argv[0]!r}; choose one of {', '.join(ANALYSES)}", file=sys.stderr)
        return 2
    return run_entry(ANALYSES[argv[0]][0], argv[1:])
