"""Question: what does the per-microbatch GQC decision cost vs the stock Trainer at the same accumulation?

Variants, all over the same data with windows of exactly ``GA`` microbatches:
  stock       GradExtTrainer --gqc none --gradient_accumulation_steps GA (HF's own loop)
  gqc_sbc     --gqc sbc, logical batch = GA x batch: GQC loop, decision without gradient norms
  gqc_gnts    --gqc gnts --gqc_threshold_start 0 --gqc_max_microbatches GA: every microbatch computes
              the window's gradient norm (one foreach norm + one host sync) and the window ends at the cap

Metric: wall time per microbatch between ``on_train_begin`` and ``on_train_end`` (setup excluded),
median over REPEATS runs per variant after one warm-up each; variants are interleaved run by run so
machine drift hits them alike. CPU runs pin BENCH_THREADS (default 1) torch threads: on a shared
machine, oversubscribed threads dominate any difference.

CPU, tiny config (default):   python recipes/benchmarks/bench_gqc_overhead.py
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
VARIANTS = ("stock", "gqc_sbc", "gqc_gnts")


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
    opts = p.parse_args(argv)
    data = _data()
    rows, medians = [], {}
    config = (
        f"gpt2 L{CFG['n_layer']} d{CFG['n_embd']} B{BATCH} T{SEQ} GA{GA} mb{MICROBATCHES}"
        + (" bf16" if CUDA else " fp32")
        + f" threads{torch.get_num_threads()}"
    )
    common = {"benchmark": "gqc_overhead", **_common.run_metadata(DEVICE), "config": config}
    times = {name: [] for name in VARIANTS}
    steps = {}
    for name in VARIANTS:
        run_once(name, data)  # warm-up
    for _ in range(REPEATS):
        for name in VARIANTS:
            t, steps[name] = run_once(name, data)
            times[name].append(t * 1e3)
    for name in VARIANTS:
        stats = _common.summarize(times[name])
        medians[name] = stats["median"]
        for stat, value in stats.items():
            rows.append(_common.row(common, name, f"ms_per_microbatch_{stat}", round(value, 3), "ms"))
        rows.append(_common.row(common, name, "optimizer_steps", steps[name], "steps"))
        print(
            f"{name:<9} median {medians[name]:.2f} ms/microbatch  spread {stats['min']:.2f}-"
            f"{stats['max']:.2f}  steps {steps[name]}",
            flush=True,
        )
    for name in ("gqc_sbc", "gqc_gnts"):
        rel = 100 * (medians[name] / medians["stock"] - 1)
        rows.append(_common.row(common, name, "overhead_vs_stock", round(rel, 2), "%"))
        print(f"{name} overhead vs stock: {rel:+.2f}%")
    path = _common.write_csv(opts.out, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
