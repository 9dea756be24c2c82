"""``hf-gradext analyze gqc RUN_DIR``: summary + plots of a GQC run from its ``trainer_state.json``.

Reads ``log_history`` (per-step ``gqc/*`` entries written with ``--logging_steps 1``), prints a short
summary, and writes two PNGs: microbatches per optimizer step, and the tested gradient norm against
the threshold. ``RUN_DIR`` may be the output dir (its ``trainer_state.json`` or, if absent, its latest
``checkpoint-*``) or a checkpoint dir.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from typing import Any

from hf_gradext.errors import UserFacingError
from hf_gradext.store import disk_errors, read_json


def find_trainer_state(run_dir: str) -> str:
    """Path of the ``trainer_state.json`` to read for ``run_dir`` (the latest checkpoint if needed)."""
    direct = os.path.join(run_dir, "trainer_state.json")
    if os.path.isfile(direct):
        return direct
    ckpts = []
    if os.path.isdir(run_dir):
        for name in os.listdir(run_dir):
            m = re.fullmatch(r"checkpoint-(\d+)", name)
            if m and os.path.isfile(os.path.join(run_dir, name, "trainer_state.json")):
                ckpts.append((int(m.group(1)), name))
    if not ckpts:
        raise UserFacingError(
            f"no trainer_state.json in {run_dir} or its checkpoint-* folders; pass the --output_dir of a "
            "run that saved a checkpoint (or called trainer.save_state())"
        )
    return os.path.join(run_dir, max(ckpts)[1], "trainer_state.json")


def gqc_steps(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-step GQC log entries (those carrying ``gqc/microbatches``)."""
    return [e for e in log_history if "gqc/microbatches" in e]


def summarize(log_history: list[dict[str, Any]]) -> dict[str, float]:
    steps = gqc_steps(log_history)
    if not steps:
        raise UserFacingError(
            "trainer_state.json has no gqc/microbatches entries; was the run trained with --gqc and logging?"
        )
    k = [float(e["gqc/microbatches"]) for e in steps]
    last = steps[-1]
    out = {
        "logged_steps": len(steps),
        "last_step": last.get("step", len(steps)),
        "microbatches_per_step_mean": statistics.fmean(k),
        "microbatches_per_step_median": statistics.median(k),
        "microbatches_per_step_max": max(k),
        "microbatches_total": last.get("gqc/microbatches_total", sum(k)),
        "tokens_total": last.get("gqc/tokens", float("nan")),
        "capped_steps": last.get("gqc/capped_steps", 0),
        "skipped_windows": last.get("gqc/skipped_windows", 0),
        "final_loss": last.get("loss", float("nan")),
    }
    evals = [e["eval_loss"] for e in log_history if "eval_loss" in e]
    if evals:
        out["final_eval_loss"] = evals[-1]
    return out


def _save_fig(fig, path: str) -> None:
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)  # a killed run never leaves a half PNG under the final name


def plot(log_history: list[dict[str, Any]], out_dir: str) -> list[str]:
    """Write ``gqc_microbatches.png`` and ``gqc_norm_vs_threshold.png`` into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = gqc_steps(log_history)
    x = [e.get("step", i + 1) for i, e in enumerate(steps)]
    os.makedirs(out_dir, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(x, [e["gqc/microbatches"] for e in steps], drawstyle="steps-mid")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("microbatches per step")
    ax.set_title("GQC: microbatches drawn per optimizer step")
    paths.append(os.path.join(out_dir, "gqc_microbatches.png"))
    _save_fig(fig, paths[-1])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(x, [e.get("gqc/grad_norm", float("nan")) for e in steps], label="tested mean-gradient norm")
    ax.plot(x, [e.get("gqc/threshold", float("nan")) for e in steps], label="threshold", linestyle="--")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.legend()
    ax.set_title("GQC: norm at decision vs threshold")
    paths.append(os.path.join(out_dir, "gqc_norm_vs_threshold.png"))
    _save_fig(fig, paths[-1])
    plt.close(fig)
    return paths


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hf-gradext analyze gqc", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="output dir (or checkpoint dir) of a --gqc training run")
    parser.add_argument("--out", default=None, help="where to write the PNGs (default: RUN_DIR/gqc_analysis)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    ns = parser.parse_args(argv)
    try:
        path = find_trainer_state(ns.run_dir)
        state = read_json(path, "pass another checkpoint-* folder of the run, or the run's --output_dir")
        history = state.get("log_history", []) if isinstance(state, dict) else []
        summary = summarize(history)
        out = ns.out or os.path.join(ns.run_dir, "gqc_analysis")
        with disk_errors(out, "--out", "writing the plots to"):
            paths = plot(history, out)
    except UserFacingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if ns.json:
        print(json.dumps({**summary, "plots": paths}, indent=1))
    else:
        print(f"GQC run: {path}")
        for key, value in summary.items():
            print(f"  {key:<30} {value:.4g}" if isinstance(value, float) else f"  {key:<30} {value}")
        for p in paths:
            print(f"  wrote {p}")
    return 0
