"""``hf-gradext analyze gqc RUN_DIR``: summary + plots of a GQC run from its ``trainer_state.json``.

Reads ``log_history`` (per-step ``gqc/*`` entries written with ``--logging_steps 1``), prints a short
summary, and writes two PNGs: microbatches per optimizer step, and the tested gradient norm against
the threshold (in the units of the run's controller, read from its ``gqc_state.json``), with the steps
forced by ``--gqc_max_microbatches`` marked. ``RUN_DIR`` may be the output dir (its ``trainer_state.json`` or, if absent, its latest
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


# What each controller's logged ``gqc/threshold`` is (the number its decision compared against).
THRESHOLD_MEANING = {
    "gnts": "gradient-norm threshold (L2 norm)",
    "sbc": "logical batch size (samples)",
    "gns": "noise tolerance (ratio)",
    "gns_sample": "noise tolerance (ratio)",
    "seesaw": "target microbatches per step",
    "mht": "percent error threshold (%)",
}


def find_controller(state_path: str, run_dir: str) -> str | None:
    """The controller name recorded in the run's ``gqc_state.json`` (next to ``state_path``, else in the
    latest checkpoint of ``run_dir``); ``None`` when the run saved none."""
    from hf_gradext.gqc.run import GQC_STATE_NAME

    candidates = [os.path.join(os.path.dirname(state_path), GQC_STATE_NAME)]
    checkpoints = sorted(
        (int(m.group(1)), name)
        for name in (os.listdir(run_dir) if os.path.isdir(run_dir) else [])
        if (m := re.fullmatch(r"checkpoint-(\d+)", name))
    )
    candidates += [os.path.join(run_dir, name, GQC_STATE_NAME) for _, name in reversed(checkpoints)]
    for path in candidates:
        if os.path.isfile(path):
            state = read_json(path, "pass the run's --output_dir with an intact checkpoint, or ignore it")
            return (state.get("core") or {}).get("controller") if isinstance(state, dict) else None
    return None


def capped_flags(steps: list[dict[str, Any]]) -> list[bool]:
    """Per log entry: did a step forced by ``--gqc_max_microbatches`` happen since the previous entry?"""
    flags, before = [], 0.0
    for entry in steps:
        now = float(entry.get("gqc/capped_steps", before))
        flags.append(now > before)
        before = now
    return flags


def plot(log_history: list[dict[str, Any]], out_dir: str, controller: str | None = None) -> list[str]:
    """Write ``gqc_microbatches.png`` and ``gqc_norm_vs_threshold.png`` into ``out_dir``.

    ``controller`` (the run's ``--gqc``) names the threshold's units; for ``gnts`` the threshold is a
    gradient norm and shares the norm's axis, for the others it gets its own panel. Steps forced by the
    microbatch cap are marked on both figures.
    """
    from hf_gradext.analysis.plots import plt, save_figure

    steps = gqc_steps(log_history)
    x = [e.get("step", i + 1) for i, e in enumerate(steps)]
    capped = capped_flags(steps)
    capped_x = [xi for xi, c in zip(x, capped) if c]
    cap_label = "step forced by --gqc_max_microbatches"
    os.makedirs(out_dir, exist_ok=True)
    name = f" ({controller})" if controller else ""
    paths = [
        os.path.join(out_dir, "gqc_microbatches.png"),
        os.path.join(out_dir, "gqc_norm_vs_threshold.png"),
    ]

    fig, ax = plt.subplots(figsize=(8, 3.8))
    k = [e["gqc/microbatches"] for e in steps]
    ax.plot(x, k, drawstyle="steps-mid", label="microbatches drawn")
    if capped_x:
        ax.scatter(
            capped_x, [ki for ki, c in zip(k, capped) if c], marker="x", color="C3", label=cap_label, zorder=3
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("microbatches per optimizer step")
    ax.set_ylim(bottom=0)
    ax.set_title(f"GQC{name}: microbatches drawn per optimizer step")
    ax.legend(loc="best", fontsize=8)
    save_figure(fig, paths[0])

    norms = [e.get("gqc/grad_norm", float("nan")) for e in steps]
    thresholds = [e.get("gqc/threshold", float("nan")) for e in steps]
    shared = controller == "gnts"
    if shared:
        fig, ax = plt.subplots(figsize=(8, 3.8))
        axes = [ax, ax]
    else:
        fig, axes = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    norm_ax, threshold_ax = axes
    norm_ax.plot(x, norms, label="tested mean-gradient norm")
    if capped_x:
        norm_ax.scatter(
            capped_x,
            [n for n, c in zip(norms, capped) if c],
            marker="x",
            color="C3",
            label=cap_label,
            zorder=3,
        )
    meaning = THRESHOLD_MEANING.get(controller or "", "threshold (in the controller's units)")
    threshold_ax.plot(x, thresholds, label=f"threshold: {meaning}", linestyle="--", color="C1")
    _log_if_positive(norm_ax, norms)
    norm_ax.set_ylabel("L2 norm of the window's\nmean gradient")
    if not shared:
        _log_if_positive(threshold_ax, thresholds)
        threshold_ax.set_ylabel(meaning.replace(" (", "\n("))
        threshold_ax.legend(loc="best", fontsize=8)
    threshold_ax.set_xlabel("optimizer step")
    norm_ax.legend(loc="best", fontsize=8)
    norm_ax.set_title(f"GQC{name}: gradient norm at each decision vs the threshold")
    save_figure(fig, paths[1])
    return paths


def _log_if_positive(ax, values: list[float]) -> None:
    """Log y scale when every finite value is positive (norms span decades); linear otherwise."""
    finite = [v for v in values if v == v and abs(v) != float("inf")]
    if finite and min(finite) > 0:
        ax.set_yscale("log")


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
        controller = find_controller(path, ns.run_dir)
        with disk_errors(out, "--out", "writing the plots to"):
            paths = plot(history, out, controller)
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
