"""Does ``hf-gradext project`` keep its memory flat as the dataset grows, and what do ``--streaming`` and
``--max_samples`` before tokenization save?

Each run is a fresh ``hf-gradext project`` process (a tiny from-scratch GPT-2, block 64, D = 8) over a
generated text file of ``--sizes`` documents (random words, 3-30 per line). Variants:

* ``full``: the default path: ``datasets`` tokenizes and groups the whole split (Arrow cache on disk), then
  the pass projects every block;
* ``streaming``: ``--streaming``: documents read through ``datasets`` streaming, tokenized 1000 at a time
  while the pass runs; every block projected;
* ``capped`` / ``capped_streaming``: ``--max_samples`` blocks (``--cap``) with and without ``--streaming``:
  only the documents those blocks need are tokenized.

Peak memory is the child's peak resident set (``ru_maxrss`` from ``os.wait4``, so one process each); the
pass's resident set is also sampled every 0.25 s once the first shard exists (``pass_rss_first_fifth`` /
``pass_rss_last_fifth``: medians of the first and last fifth of the samples), which tells a steady growth
from the transient spikes of tokenization and GC that decide the peak. ``seconds`` is its wall time. Every run gets its own empty ``HF_DATASETS_CACHE``, so nothing tokenized in
one run is reused by the next. The row files are checked to hold the expected number of examples.

    python recipes/benchmarks/bench_project_memory.py                 # sizes 20000 and 80000 documents
    python recipes/benchmarks/bench_project_memory.py --sizes 5000,20000 --out /tmp/mem.csv

Writes (appends to) bench_project_memory.csv next to this script. Target (issue #14 item 3): peak memory
flat with dataset size (growth between the two sizes within a few percent) for ``streaming``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import tokenizers

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "ran",
    "sat",
    "on",
    "mat",
    "park",
    "ball",
    "red",
    "blue",
    "happy",
    "sad",
    "Lily",
    "Tom",
    "went",
    "home",
    "and",
]
MODEL = ["--config_overrides", "n_layer=1,n_embd=16,n_head=2", "--block_size", "64", "--seed", "3"]
PROJ = ["--proj_rank_total", "8", "--proj_rank_min", "2", "--proj_dtype", "float32"]
VARIANTS = {
    "full": [],
    "streaming": ["--streaming"],
    "capped": ["--max_samples", "{cap}"],
    "capped_streaming": ["--streaming", "--max_samples", "{cap}"],
}


def write_documents(path: Path, n_docs: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(n_docs):
            handle.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))) + "\n")


def _command() -> list[str]:
    script = Path(sys.executable).with_name("hf-gradext")
    return [str(script)] if script.exists() else [sys.executable, "-m", "hf_gradext.cli"]


def run_once(train_file: Path, out: Path, extra: list[str], work: Path) -> tuple[float, float, list[float]]:
    """(peak RSS in MiB, wall seconds, RSS samples in MiB taken every 0.25 s once the first shard exists)
    of one ``project`` process; raises if it fails. The samples tell a steady growth (a leak) from the
    transient spikes that decide the peak."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(work / "hf_cache"), "OMP_NUM_THREADS": "1"}
    argv = [*_command(), "project", *MODEL, *PROJ, "--train_file", str(train_file)]
    argv += ["--output_dir", str(out), "--device", "cpu", "--batch_size", "32", "--disable_tqdm", *extra]
    start = time.perf_counter()
    samples: list[float] = []
    with (work / "log.txt").open("w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        started = False  # the pass has written its first shard (looked up until then, not every poll)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            started = started or next(out.glob("*.safetensors"), None) is not None
            if started and (kib := _common.proc_status_kib("VmRSS", proc.pid)) is not None:
                samples.append(kib / 1024)
            time.sleep(0.25)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = (work / "log.txt").read_text().strip().splitlines()[-5:]
        raise SystemExit(f"project exited {proc.returncode}: {' | '.join(tail)}")
    return usage.ru_maxrss / 1024, seconds, samples  # ru_maxrss: KiB on Linux


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="20000,80000", help="Document counts, comma-separated.")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="Comma-separated subset of variants.")
    parser.add_argument("--cap", type=int, default=500, help="--max_samples of the capped variants.")
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".csv")), help="CSV to append to.")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    common = {
        "benchmark": "project_memory",
        **_common.run_metadata("cpu"),
        # the tokenizers release decides the slope of a long pass (0.23.1 kept 64 B per document)
        "config": f"gpt2 L1 d16 T64 D8 B32 cap{args.cap} threads1 tokenizers{tokenizers.__version__}",
    }
    rows, peaks, steady = [], {}, {}
    root = Path(tempfile.mkdtemp(prefix="bench_project_memory-"))
    try:
        for n_docs in sizes:
            data = root / f"docs{n_docs}.txt"
            write_documents(data, n_docs)
            for name in variants:
                work = root / f"{name}-{n_docs}"
                work.mkdir()
                extra = [a.format(cap=args.cap) for a in VARIANTS[name]]
                peak, seconds, samples = run_once(data, work / "rows", extra, work)
                stats = json.loads((work / "rows" / "projection_stats.json").read_text())
                examples = int(stats["examples_this_run"])
                peaks[name, n_docs] = peak
                variant = f"{name}_{n_docs}docs"
                # The pass's steady state: median RSS of the first and of the last fifth of the samples.
                fifth = max(1, len(samples) // 5)
                early = statistics.median(samples[:fifth]) if samples else float("nan")
                late = statistics.median(samples[-fifth:]) if samples else float("nan")
                steady[name, n_docs] = late
                rows += [
                    _common.row(common, variant, "peak_rss", round(peak, 1), "MiB"),
                    _common.row(common, variant, "pass_rss_first_fifth", round(early, 1), "MiB"),
                    _common.row(common, variant, "pass_rss_last_fifth", round(late, 1), "MiB"),
                    _common.row(common, variant, "pass_rss_samples", len(samples), "samples"),
                    _common.row(common, variant, "seconds", round(seconds, 2), "s"),
                    _common.row(common, variant, "examples", examples, "blocks"),
                ]
                print(
                    f"{variant:32s} peak {peak:8.1f} MiB  pass RSS {early:7.1f} -> {late:7.1f} MiB  "
                    f"{seconds:7.2f} s  {examples} blocks",
                    flush=True,
                )
                shutil.rmtree(work)
        if len(sizes) >= 2:
            small, large = sizes[0], sizes[-1]
            for name in variants:
                growth = 100 * (peaks[name, large] / peaks[name, small] - 1)
                rows.append(
                    _common.row(
                        common, name, f"peak_rss_growth_{small}_to_{large}docs", round(growth, 2), "%"
                    )
                )
                print(f"{name:32s} peak RSS growth {small} -> {large} documents: {growth:+.1f}%")
                late = 100 * (steady[name, large] / steady[name, small] - 1)
                rows.append(
                    _common.row(common, name, f"pass_rss_growth_{small}_to_{large}docs", round(late, 2), "%")
                )
                print(f"{name:32s} end-of-pass RSS growth {small} -> {large} documents: {late:+.1f}%")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    path = _common.write_csv(args.out, rows, append=True)
    print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
