"""Question: at EQUAL DATA, which window policy gives the best eval loss per optimizer step?

Every run consumes the same microbatches (same stream for every variant of a seed: hashed and checked) of
the embedded corpus with the tiny GPT-2 (data, model and eval as in ``gqc_quality.py``, whose
``EqualDataEval`` and ``eval_loss`` are reused; shorter blocks here so 3 seeds x all variants fit the CPU).
A run is a point (optimizer steps, final eval loss); the *fixed-accumulation frontier* joins, for each
window ``k``, the best of three learning rates. The goal: a configuration on or below that frontier
that is within 1% of accumulation 1's eval loss with at most half of its optimizer steps.

Variants (``--variants`` takes a comma list of these names; every name is parsed, so other values work):
  ga{k}_lr{m}                fixed accumulation k (HF's own loop, --gqc none), LR = LR0 x sqrt(k) x m;
                             the default set: k in 1, 2, 4, 8 and m in 0.5, 1, 2
  gnts_rel{v}_sqrt           gnts, relative threshold v, LR coupled sqrt(k) (--gqc_lr_coupling sqrt, k0 1)
  sbc_to{K}_sqrt             sbc, logical batch linear over the data from 1 sample to K microbatches of
                             samples (sbc steps at >= threshold samples: windows ceil(threshold / B)
                             microbatches, so 1 until the threshold passes B), sqrt(k) LR
  gns_sample_tol{v}_sqrt     gns_sample (per-sample noise scale), tolerance v, sqrt(k) LR; append
                             ``_every{N}`` to measure the norms on every N-th microbatch only
                             (--gqc_sample_norm_every N), or ``_norm`` to measure them on the
                             LayerNorm parameters only (--gqc_sample_norm_layers norm)
  seesaw_k{k0}_cap{c}        Seesaw (--gqc seesaw): k0 microbatches, doubled where the cosine LR would
                             halve (up to the cap c), LR x 1/sqrt(2) per doubling; peak LR = LR0 x sqrt(k0)
  suffix ``_none`` instead of ``_sqrt``: the controller without LR coupling (peak LR0).
LR schedule for all: cosine over the data with a 5% warmup (fixed k: HF's scheduler over N/k steps; GQC:
over N microbatches advanced by each window), AdamW (0.9, 0.95), wd 0.1, clipping 1.0 once per step.

CPU (default, about 20 minutes on a shared 2-core machine, 1 torch thread):
    python recipes/benchmarks/gqc_pareto.py
Smoke (what tests/test_benchmarks.py runs; seconds, numbers meaningless):
    python recipes/benchmarks/gqc_pareto.py --smoke --out /tmp/pareto.csv
GPU, GPT-2 small, bf16 (recipes/benchmarks/gpu_run.sh pareto): --device cuda
Re-aggregate per-seed rows of several CSVs (e.g. seeds run in separate commands) into one table + PNG:
    python recipes/benchmarks/gqc_pareto.py --from-csv a.csv,b.csv --out merged.csv

Writes a long-format CSV (``_common.CSV_FIELDS``: one row per variant x seed x metric, then the
aggregates with seed ``all``; the ``config`` column holds the run's exact settings and the variant's own)
and a PNG next to it: eval loss vs optimizer steps, every run's final point, seed means with min-max
bars, the fixed-k frontier and the goal region.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common

HERE = Path(__file__).resolve().parent
FIXED = tuple(f"ga{k}_lr{m:g}" for k in (1, 2, 4, 8) for m in (0.5, 1.0, 2.0))
ADAPTIVE = (
    "gnts_rel0.8_sqrt",
    "sbc_to4_sqrt",
    "sbc_to8_sqrt",
    "gns_sample_tol2_sqrt",
    "seesaw_k1_cap8",
    "seesaw_k2_cap16",
)
SMOKE_VARIANTS = (
    "ga1_lr1",
    "ga2_lr1",
    "gnts_rel0.8_sqrt",
    "sbc_to4_sqrt",
    "gns_sample_tol4_sqrt",
    "seesaw_k1_cap4",
)
WARMUP, WEIGHT_DECAY, CAP, EVAL_POINTS = 0.05, 0.1, 16, 8
VARIANT_SEP = " | variant: "  # config column of per-seed rows: the run's settings, then the variant's


def _settings(opts: argparse.Namespace) -> dict[str, Any]:
    """Sizes of this run (CPU tiny, GPU GPT-2 small, or the smoke size)."""
    if opts.device == "cuda":
        return dict(config="small", batch=8, seq=256, train_blocks=2048, eval_blocks=128, lr0=6e-4)
    if opts.smoke:
        return dict(config="tiny", batch=2, seq=16, train_blocks=32, eval_blocks=4, lr0=3e-3)
    # LR0 3e-3 (gqc_quality's LR). Tried 6e-3 (seed 0, docs/gqc.md): accumulation 1 at 1.2e-2 and every
    # k >= 2 at >= 6e-3 diverge into Adam loss spikes, so at this scale the stable LR, not the sqrt(k) rule,
    # bounds large windows; 3e-3 keeps GA1's best (6e-3, its x2 probe) and more of each k's grid inside.
    return dict(config="tiny", batch=8, seq=64, train_blocks=2048, eval_blocks=128, lr0=3e-3)


# ---------------------------------------------------------------------- variants
def variant_args(name: str, n: int, lr0: float) -> tuple[dict[str, Any], str]:
    """(GradExtArguments overrides, exact description) of a variant name (module docstring)."""
    if m := re.fullmatch(r"ga(\d+)_lr([\d.]+)", name):
        k, mult = int(m[1]), float(m[2])
        lr = lr0 * math.sqrt(k) * mult
        return {"gradient_accumulation_steps": k, "learning_rate": lr}, f"fixed k={k}, lr={lr:.4g}"
    common: dict[str, Any] = {"gqc_microbatch_budget": n, "gqc_max_microbatches": CAP}
    if m := re.fullmatch(r"seesaw_k(\d+)_cap(\d+)", name):
        k0, cap = int(m[1]), int(m[2])
        lr = lr0 * math.sqrt(k0)
        kw = {
            "gqc": "seesaw",
            "gqc_threshold_start": float(k0),
            "gqc_max_microbatches": cap,
            "learning_rate": lr,
        }
        return {**common, **kw}, f"seesaw k0={k0} cap={cap}, peak lr={lr:.4g}"
    m = re.fullmatch(r"(gnts_rel|sbc_to|gns_sample_tol)([\d.]+)_(sqrt|none)(?:_every(\d+))?(_norm)?", name)
    if not m or ((m[4] or m[5]) and m[1] != "gns_sample_tol"):
        raise SystemExit(f"unknown variant {name!r}; see the module docstring for the names")
    kind, value, coupling = m[1], float(m[2]), m[3]
    every = int(m[4]) if m[4] else 1
    layers = "norm" if m[5] else "all"
    kw = {"learning_rate": lr0, "gqc_lr_coupling": coupling}
    if coupling == "sqrt":
        kw["gqc_lr_coupling_k0"] = 1
    if kind == "gnts_rel":
        kw |= {"gqc": "gnts", "gqc_threshold_mode": "relative", "gqc_threshold_start": value}
        what = f"gnts relative {value:g}"
    elif kind == "sbc_to":
        kw |= {"gqc": "sbc", "gqc_schedule": "linear", "gqc_max_microbatches": int(value)}
        what = f"sbc 1 sample -> {value:g} microbatches of samples, linear over data"
    else:
        kw |= {"gqc": "gns_sample", "gqc_threshold_start": value, "gqc_sample_norm_every": every}
        what = f"gns_sample tolerance {value:g}" + (
            f", norms every {every} microbatches" if every > 1 else ""
        )
        if layers != "all":
            kw["gqc_sample_norm_layers"] = layers
            what += f", norms of the {layers} layers only"
    cap = kw.get("gqc_max_microbatches", CAP)
    return {**common, **kw}, f"{what}, lr {lr0:.4g} coupled {coupling}(k/1), cap {cap}"


def _sbc_samples(overrides: dict[str, Any], batch: int) -> None:
    """sbc reads samples: from 1 sample (a window of 1 microbatch) to K x batch samples."""
    if overrides.get("gqc") == "sbc":
        overrides["gqc_threshold_start"] = 1.0
        overrides["gqc_threshold_end"] = float(overrides["gqc_max_microbatches"] * batch)


# ---------------------------------------------------------------------- one run
def run_variant(name: str, seed: int, data, init_model, s: dict[str, Any], opts) -> dict[str, Any]:
    from gqc_quality import EqualDataEval
    from transformers import default_data_collator

    from hf_gradext.arguments import GradExtArguments
    from hf_gradext.trainer import GradExtTrainer

    tok, train, evals = data
    n = len(train) // s["batch"]
    marks = [n * i // EVAL_POINTS for i in range(1, EVAL_POINTS + 1)]
    overrides, what = variant_args(name, n, s["lr0"])
    _sbc_samples(overrides, s["batch"])
    with tempfile.TemporaryDirectory() as out:
        args = GradExtArguments(
            output_dir=out,
            config_name=s["config"],
            block_size=s["seq"],
            per_device_train_batch_size=s["batch"],
            num_train_epochs=1,
            lr_scheduler_type="cosine",
            warmup_steps=WARMUP,  # a fraction: of optimizer steps (fixed k) or of microbatches (GQC)
            weight_decay=WEIGHT_DECAY,
            adam_beta2=0.95,
            max_grad_norm=1.0,
            logging_steps=10**9,
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=opts.device != "cuda",
            bf16=opts.device == "cuda",
            seed=seed,
            **overrides,
        )
        model = copy.deepcopy(init_model)
        trainer = GradExtTrainer(
            model=model,
            args=args,
            train_dataset=train,
            processing_class=tok,
            data_collator=default_data_collator,
        )
        probe = EqualDataEval(trainer, evals, marks)
        trainer.add_microbatch_observer(probe)
        trainer.add_callback(probe)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    if probe.microbatches != n or len(probe.points) != EVAL_POINTS + 1:
        raise RuntimeError(
            f"{name}: consumed {probe.microbatches}/{n} microbatches, {len(probe.points)} evals"
        )
    return {"name": name, "seed": seed, "what": what, "points": probe.points, "stream": probe.stream.hexdigest(),
            "seconds": seconds, "n": n}  # fmt: skip


def build(s: dict[str, Any], seed: int, device: str):
    """(tokenizer, train blocks, eval blocks), model initialized with ``seed``."""
    import torch
    import transformers

    from hf_gradext.arguments import GradExtArguments
    from hf_gradext.data import build_datasets, load_tokenizer
    from hf_gradext.models import build_config

    with tempfile.TemporaryDirectory() as out:
        args = GradExtArguments(output_dir=out, config_name=s["config"], block_size=s["seq"], report_to=[],
                                use_cpu=device != "cuda")  # fmt: skip
        tok = load_tokenizer(args)
        train, evals = build_datasets(args, tok, block_size=s["seq"])
        config = build_config(args, tok)
    unit = s["batch"] * 8  # a multiple of 8 microbatches: every fixed k <= 8 ends on a full window
    keep = min(len(train), s["train_blocks"]) // unit * unit
    train, evals = train.select(range(keep)), evals.select(range(min(len(evals), s["eval_blocks"])))
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config)
    if device == "cuda":
        model = model.cuda()
    return (tok, train, evals), model, config


# ---------------------------------------------------------------------- aggregation
def per_seed_rows(r: dict[str, Any], common: dict[str, Any], config: str) -> list[dict[str, Any]]:
    last = r["points"][-1]
    base = {**common, "config": f"{config}{VARIANT_SEP}{r['what']}, seed {r['seed']}"}
    variant = f"{r['name']}/seed{r['seed']}"
    rows = [
        _common.row(base, variant, "eval_loss", round(last["eval_loss"], 5), "nats/token"),
        _common.row(base, variant, "optimizer_steps", last["optimizer_steps"], "steps"),
        _common.row(
            base, variant, "mean_microbatches_per_step", round(last["mean_microbatches_per_step"], 3), "mb"
        ),
        _common.row(base, variant, "microbatches", last["microbatches"], "mb"),
        _common.row(base, variant, "seconds", round(r["seconds"], 1), "s"),
    ]
    for p in r["points"][1:-1]:  # the trajectory at every 1/EVAL_POINTS of the data
        frac = round(p["microbatches"] / r["n"], 4)
        rows.append(_common.row(base, variant, f"eval_loss@{frac}", round(p["eval_loss"], 5), "nats/token"))
        rows.append(_common.row(base, variant, f"optimizer_steps@{frac}", p["optimizer_steps"], "steps"))
    return rows


def _finals(rows: list[dict[str, str]]) -> dict[str, dict[str, list[float]]]:
    """``{variant: {"loss": [...], "steps": [...]}}`` over seeds, from per-seed rows."""
    out: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        if "/seed" not in row["variant"] or row["metric"] not in ("eval_loss", "optimizer_steps"):
            continue
        name = row["variant"].split("/seed")[0]
        key = "loss" if row["metric"] == "eval_loss" else "steps"
        out.setdefault(name, {"loss": [], "steps": []})[key].append(float(row["value"]))
    return out


def frontier(finals: dict[str, dict[str, list[float]]]) -> list[tuple[int, str, float, float]]:
    """Per fixed k: (k, best variant, mean steps, mean loss) over its LR probes, by mean eval loss."""
    best: dict[int, tuple[str, float, float]] = {}
    for name, f in finals.items():
        if m := re.fullmatch(r"ga(\d+)_lr[\d.]+", name):
            k, loss = int(m[1]), statistics.mean(f["loss"])
            if k not in best or loss < best[k][2]:
                best[k] = (name, statistics.mean(f["steps"]), loss)
    return [(k, *best[k]) for k in sorted(best)]


def frontier_loss_at(front: list[tuple[int, str, float, float]], steps: float) -> float:
    """The frontier's eval loss at ``steps`` (linear in log steps between fixed-k points; nan outside)."""
    pts = sorted((st, loss) for _, _, st, loss in front)
    for (s0, l0), (s1, l1) in zip(pts, pts[1:]):
        if s0 <= steps <= s1:
            w = (math.log(steps) - math.log(s0)) / (math.log(s1) - math.log(s0)) if s1 > s0 else 0.0
            return l0 + w * (l1 - l0)
    return math.nan


def summarize(
    rows: list[dict[str, str]], common: dict[str, Any], config: str
) -> tuple[list[dict], list[str]]:
    """Aggregate rows (seed ``all``) and the printed table (markdown)."""
    finals = _finals(rows)
    front = frontier(finals)
    ga1 = next((loss for k, _, _, loss in front if k == 1), math.nan)
    ga1_steps = next((st for k, _, st, _ in front if k == 1), math.nan)
    header = "| config | optimizer steps | eval loss mean ± spread (min–max)/2 | vs frontier | goal |"
    out: list[dict] = []
    table = [header, "|---|---|---|---|---|"]
    on_front = {name for _, name, _, _ in front}
    for name in sorted(finals, key=lambda v: (-statistics.mean(finals[v]["steps"]), v)):
        f = finals[name]
        mean, spread = statistics.mean(f["loss"]), (max(f["loss"]) - min(f["loss"])) / 2
        steps = statistics.mean(f["steps"])
        gap = mean - frontier_loss_at(front, steps)
        goal = mean <= 1.01 * ga1 and steps <= ga1_steps / 2
        base = {**common, "config": config}
        variant = f"{name}/all"
        out += [
            _common.row(base, variant, "eval_loss_mean", round(mean, 5), "nats/token"),
            _common.row(base, variant, "eval_loss_spread_half", round(spread, 5), "nats/token"),
            _common.row(base, variant, "eval_loss_std", round(statistics.stdev(f["loss"]), 5) if len(f["loss"]) > 1 else "", "nats/token"),
            _common.row(base, variant, "optimizer_steps_mean", round(steps, 1), "steps"),
            _common.row(base, variant, "gap_to_fixed_frontier", round(gap, 5) if math.isfinite(gap) else "", "nats/token"),
            _common.row(base, variant, "meets_goal", int(goal), "bool"),
            _common.row(base, variant, "seeds", len(f["loss"]), "runs"),
        ]  # fmt: skip
        mark = " (frontier)" if name in on_front else ""
        gap_s = f"{gap:+.4f}" if math.isfinite(gap) else "outside"
        table.append(
            f"| {name}{mark} | {steps:.0f} | {mean:.4f} ± {spread:.4f} | {gap_s} | {'yes' if goal else 'no'} |"
        )
    return out, table


def plot(rows: list[dict[str, str]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finals = _finals(rows)
    front = frontier(finals)
    fig, ax = plt.subplots(figsize=(8, 5))
    ga1 = next((loss for k, _, _, loss in front if k == 1), None)
    ga1_steps = next((st for k, _, st, _ in front if k == 1), None)
    if ga1 is not None:  # the goal region: <= half of GA1's steps, within 1% of its loss
        ax.axvspan(0, ga1_steps / 2, ymax=1, color="tab:green", alpha=0.06)
        ax.axhline(
            1.01 * ga1, color="tab:green", lw=0.8, ls=":", label="1.01 x GA1 loss; shaded: <= GA1/2 steps"
        )
    ax.plot(
        [st for _, _, st, _ in front],
        [loss for *_, loss in front],
        "k-",
        lw=1.5,
        label="fixed-k frontier (best LR per k)",
    )
    markers = iter("osD^v<>pP*hX")
    for name in sorted(finals):
        f = finals[name]
        mean, steps = statistics.mean(f["loss"]), statistics.mean(f["steps"])
        lo, hi = mean - min(f["loss"]), max(f["loss"]) - mean
        fixed = name.startswith("ga")
        ax.scatter(f["steps"], f["loss"], s=8, alpha=0.35, color="gray" if fixed else None)
        if fixed:
            ax.errorbar(steps, mean, yerr=[[lo], [hi]], fmt=".", color="gray", alpha=0.7, ms=5)
            ax.annotate(
                name, (steps, mean), fontsize=6, color="gray", xytext=(3, 2), textcoords="offset points"
            )
        else:
            ax.errorbar(steps, mean, yerr=[[lo], [hi]], fmt=next(markers, "o"), ms=6, capsize=2, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("optimizer steps (equal data for every run)")
    ax.set_ylabel("final eval loss (nats/token)")
    ax.set_title(title, fontsize=6, wrap=True)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--smoke", action="store_true", help="toy sizes, 1 seed, a few variants (tests)")
    p.add_argument("--seeds", default=None, help="comma list (default 0,1,2; smoke 0)")
    p.add_argument("--variants", default=None, help="comma list (default: every fixed and adaptive variant)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    p.add_argument("--from-csv", default=None, help="aggregate the per-seed rows of these CSVs, no training")
    p.add_argument(
        "--out", default=None, help="CSV path (PNG next to it); default gqc_pareto[_cuda].csv here"
    )
    opts = p.parse_args(argv)
    os.environ.setdefault("QUALITY_DEVICE", opts.device)  # gqc_quality's eval_loss autocasts on CUDA
    os.environ.setdefault("QUALITY_THREADS", str(opts.threads))
    import torch

    out = Path(opts.out or HERE / ("gqc_pareto" + ("_cuda" if opts.device == "cuda" else "") + ".csv"))
    s = _settings(opts)
    if opts.from_csv:
        rows = []
        for path in opts.from_csv.split(","):
            with open(path, newline="") as fh:
                rows += [r for r in csv.DictReader(fh) if "/seed" in r["variant"]]
        common = {k: rows[0][k] for k in ("benchmark", "device", "torch", "transformers", "date")}
        config = rows[0]["config"].split(VARIANT_SEP)[0]
        return _finish(rows, common, config, out)
    if opts.device == "cpu":
        torch.set_num_threads(opts.threads)
    seeds = [int(x) for x in (opts.seeds or ("0" if opts.smoke else "0,1,2")).split(",")]
    variants = (
        opts.variants.split(",")
        if opts.variants
        else list(SMOKE_VARIANTS if opts.smoke else FIXED + ADAPTIVE)
    )
    import transformers

    import hf_gradext

    common = {"benchmark": "gqc_pareto", **_common.run_metadata(opts.device)}
    rows: list[dict[str, Any]] = []
    config = ""
    t_start = time.perf_counter()
    for seed in seeds:
        data, init_model, mconf = build(s, seed, opts.device)
        n = len(data[1]) // s["batch"]
        params = sum(p.numel() for p in init_model.parameters())
        config = (
            f"gpt2 {s['config']} L{mconf.n_layer} d{mconf.n_embd} ({params / 1e6:.2f}M) vocab{mconf.vocab_size} "
            f"B{s['batch']} T{s['seq']} {len(data[1])} train blocks x 1 epoch = {n} microbatches; {len(data[2])} eval "
            f"blocks; AdamW(0.9,0.95) LR0 {s['lr0']:g} wd{WEIGHT_DECAY} cosine warmup{WARMUP} clip1 cap{CAP}; "
            + ("bf16" if opts.device == "cuda" else f"fp32 threads{torch.get_num_threads()}")
            + f"; python {platform.python_version()} hf_gradext {hf_gradext.__version__} accelerate "
            + __import__("accelerate").__version__
            + f" transformers {transformers.__version__}"
        )
        print(f"seed {seed}: {config}", flush=True)
        streams = set()
        for name in variants:
            r = run_variant(name, seed, data, init_model, s, opts)
            streams.add(r["stream"])
            last = r["points"][-1]
            print(f"  {name:<24} steps {last['optimizer_steps']:>4}  eval {last['eval_loss']:.4f}  "
                  f"mb/step {last['mean_microbatches_per_step']:.2f}  {r['seconds']:.0f}s  "
                  f"[{time.perf_counter() - t_start:.0f}s total]", flush=True)  # fmt: skip
            rows += per_seed_rows(r, common, config)
        if len(streams) != 1:
            raise SystemExit(f"seed {seed}: variants saw different microbatch streams; results not written")
    _finish([{k: str(v) for k, v in r.items()} for r in rows], common, config, out, raw=rows)


def _finish(rows: list[dict[str, str]], common: dict[str, Any], config: str, out: Path, raw=None) -> None:
    agg, table = summarize(rows, common, config)
    _common.write_csv(out, (raw if raw is not None else rows) + agg)
    plot(rows, out.with_suffix(".png"), config)
    print("\n".join(table))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    sys.exit(main())
