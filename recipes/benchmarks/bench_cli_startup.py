"""How long the ``hf-gradext`` command takes to answer: ``--help``, ``--version``, ``train --help``.

Each variant is a fresh process (what a user waits for), timed with ``time.perf_counter`` around
``subprocess.run``; variants run round-robin so machine load hits them alike. The console script next to
this interpreter is used when it exists (``<venv>/bin/hf-gradext``), else ``python -m hf_gradext.cli``
(which imports the package under the name ``hf_gradext.cli``, so it pays for torch: reported as such).

    python recipes/benchmarks/bench_cli_startup.py --reps 7

Target (issue: a newcomer's first hour): ``hf-gradext --help`` and ``--version`` under 3 s.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _common

VARIANTS = {"help": ["--help"], "version": ["--version"], "train_help": ["train", "--help"]}


def _command() -> tuple[list[str], str]:
    script = Path(sys.executable).with_name("hf-gradext")
    if script.exists():
        return [str(script)], "console script"
    found = shutil.which("hf-gradext")
    if found:
        return [found], "console script (PATH)"
    return [sys.executable, "-m", "hf_gradext.cli"], "python -m hf_gradext.cli"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=7, help="processes per variant")
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".csv")), help="CSV to write")
    opts = parser.parse_args(argv)
    if opts.reps < 1:
        parser.error("--reps must be >= 1")
    base, how = _command()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(opts.reps):
        for name, args in VARIANTS.items():
            start = time.perf_counter()
            done = subprocess.run([*base, *args], capture_output=True, text=True, timeout=600)
            elapsed = time.perf_counter() - start
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                return 1
            times[name].append(elapsed)
    common = {"benchmark": "cli_startup", **_common.run_metadata("cpu", cpu_cores=True), "config": how}
    rows = []
    print(f"{'variant':<12} {'median s':>9} {'min s':>7} {'max s':>7}   ({how}, {opts.reps} processes each)")
    for name, values in times.items():
        stats = _common.summarize(values)
        print(f"{name:<12} {stats['median']:9.3f} {stats['min']:7.3f} {stats['max']:7.3f}")
        rows += [_common.row(common, name, f"wall_{k}", round(v, 4), "s") for k, v in stats.items()]
    _common.write_csv(opts.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
