"""Question: what does the per-microbatch GQC decision cost vs the stock Trainer at the same accumulation?

Variants, all over the same data with windows of exactly ``GA`` microbatches:
  stock       GradExtTrainer --gqc none --gradient_accumulation_steps GA (HF's own loop)
  gqc_sbc     --gqc sbc, logical batch = GA x batch: GQC loop, decision without gradient norms
  gqc_gnts    --gqc gnts --gqc_threshold_start 0 --gqc_max_microbatches GA: every microbatch computes
              the window's gradient norm (one foreach norm + one host sync) and the window ends at the cap
  gqc_gns_sample[_everyN|_norm]
              --gqc gns_sample --gqc_threshold_start 0 --gqc_max_microbatches GA [--gqc_sample_norm_every N]
              [--gqc_sample_norm_layers norm]:
              as gqc_gnts plus per-sample gradient norms (ghost norms from the training backward) on every
              (N-th) microbatch; tolerance 0 never passes on this random data, so windows end at the cap too
              (the optimizer_steps rows show it). Reported as overhead_vs_gnts.

Metric: wall time per microbatch between ``on_train_begin`` and ``on_train_end`` (setup excluded),
median over REPEATS runs per variant after one warm-up each; variants are interleaved run by run so
machine drift hits them alike. CPU runs pin BENCH_THREADS (default 1) torch threads: on a shared
machine, oversubscribed threads dominate any difference.

CPU, tiny config (default):   python recipes/benchmarks/bench_gqc_overhead.py
Some variants, rows appended:  python recipes/benchmarks/bench_gqc_overhead.py --append \
                                 --variants gqc_gnts,gqc_gns_sample,gqc_gns_sample_every16
CUDA, GPT-2 small, bf16:      BENCH_DEVICE=cuda python recipes/benchmarks/bench_gqc_overhead.py
Writes bench_gqc_overhead.csv (long format) next to this script (``--out`` to change).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import _common
import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback

from hf_gradext.arguments import GradExtArguments
from hf_gradext.trainer import GradExtTrainer

DEVICE = os.environ.get("BENCH_DEVICE", "cpu")
CUDA = DEVICE == "cuda"
if CUDA:
    CFG = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=512)
    BATCH, SEQ, MICROBATCHES, GA = 8, 512, 96, 4
else:
    CFG = dict(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=64)
    BATCH, SEQ, MICROBATCHES, GA = 8, 64, 96, 4
REPEATS = int(os.environ.get("BENCH_REPEATS", 5))
if not CUDA:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 1)))
SAMPLE_NORM_EVERY = {
    "gqc_gns_sample": 1,
    "gqc_gns_sample_every4": 4,
    "gqc_gns_sample_every16": 16,
    "gqc_gns_sample_every64": 64,
    "gqc_gns_sample_norm": 1,  # LayerNorm parameters only (--gqc_sample_norm_layers norm)
}
VARIANTS = ("stock", "gqc_sbc", "gqc_gnts", *SAMPLE_NORM_EVERY)


class _Clock(TrainerCallback):
    def on_train_begin(self, args, state, control, **kw):
        _common.sync(DEVICE)
        self.t0 = time.perf_counter()

    def on_train_end(self, args, state, control, **kw):
        _common.sync(DEVICE)
        self.seconds = time.perf_counter() - self.t0


def _data():
    g = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": (ids := torch.randint(0, CFG["vocab_size"], (SEQ,), generator=g)),
            "labels": ids.clone(),
        }
        for _ in range(BATCH * MICROBATCHES)
    ]


def _variant_args(name: str) -> dict:
    if name == "stock":
        return {"gradient_accumulation_steps": GA}
    if name == "gqc_sbc":
        return {"gqc": "sbc", "gqc_threshold_start": float(GA * BATCH), "gqc_max_microbatches": GA}
    if name in SAMPLE_NORM_EVERY:
        return {
            "gqc": "gns_sample",
            "gqc_threshold_start": 0.0,
            "gqc_max_microbatches": GA,
            "gqc_sample_norm_every": SAMPLE_NORM_EVERY[name],
            "gqc_sample_norm_layers": "norm" if name.endswith("_norm") else "all",
        }
    return {"gqc": "gnts", "gqc_threshold_start": 0.0, "gqc_max_microbatches": GA}


def run_once(name: str, data) -> tuple[float, int]:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**CFG, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    with tempfile.TemporaryDirectory() as out:
        args = GradExtArguments(
            output_dir=out,
            per_device_train_batch_size=BATCH,
            num_train_epochs=1,
            learning_rate=1e-4,
            logging_steps=10_000,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=not CUDA,
            bf16=CUDA,
            seed=0,
            **_variant_args(name),
        )
        clock = _Clock()
        trainer = GradExtTrainer(model, args=args, train_dataset=data, callbacks=[clock])
        trainer.train()
        return clock.seconds / MICROBATCHES, trainer.state.global_step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).with_suffix(".csv")), help="CSV to (over)write")
    p.add_argument("--append", action="store_true", help="append the rows to --out instead of overwriting it")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {', '.join(VARIANTS)} (default: all)",
    )
    opts = p.parse_args(argv)
    variants = tuple(v for v in opts.variants.split(",") if v)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    data = _data()
    rows, medians = [], {}
    config = (
        f"gpt2 L{CFG['n_layer']} d{CFG['n_embd']} B{BATCH} T{SEQ} GA{GA} mb{MICROBATCHES}"
        + (" bf16" if CUDA else " fp32")
        + f" threads{torch.get_num_threads()}"
    )
    common = {"benchmark": "gqc_overhead", **_common.run_metadata(DEVICE), "config": config}
    times = {name: [] for name in variants}
    steps = {}
    for name in variants:
        run_once(name, data)  # warm-up
    for _ in range(REPEATS):
        for name in variants:
            t, steps[name] = run_once(name, data)
            times[name].append(t * 1e3)
    for name in variants:
        stats = _common.summarize(times[name])
        medians[name] = stats["median"]
        for stat, value in stats.items():
            rows.append(_common.row(common, name, f"ms_per_microbatch_{stat}", round(value, 3), "ms"))
        rows.append(_common.row(common, name, "optimizer_steps", steps[name], "steps"))
        print(
            f"{name:<22} median {medians[name]:.2f} ms/microbatch  spread {stats['min']:.2f}-"
            f"{stats['max']:.2f}  steps {steps[name]}",
            flush=True,
        )
    for base, names in (("stock", ("gqc_sbc", "gqc_gnts")), ("gqc_gnts", tuple(SAMPLE_NORM_EVERY))):
        for name in names:
            if base not in medians or name not in medians:
                continue
            rel = 100 * (medians[name] / medians[base] - 1)
            metric = f"overhead_vs_{base.removeprefix('gqc_')}"
            rows.append(_common.row(common, name, metric, round(rel, 2), "%"))
            print(f"{name} {metric.replace('_', ' ')}: {rel:+.2f}%")
    path = _common.write_csv(opts.out, rows, append=opts.append)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
