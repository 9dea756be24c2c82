"""Benchmark: what does per-sample gradient collection cost a training run?

Question: optimizer-step time of ``GradExtTrainer`` with ``--collect_gradients`` every step, relative
to the same run without collection: statistics only, norms to disk, full per-sample gradients to disk
(training mode, from the training backward), and the ``loop`` baseline (one backward per sample,
separate mode). For ``full`` also the achieved write rate against the disk's sequential write speed
measured with ``dd`` in the same run (target on a GPU: >= 70% of it whenever compute is faster than disk).
The shard checksums' cost, from the shard writer's own timers: ``checksum_cpu_share_of_write`` (CPU
seconds hashing / seconds writing shards; target < 3%: each slice is hashed right after it is written,
inside the write), and ``full_disk_nocrc`` (checksums off) next to ``full_disk``.

CPU (what runs here; tiny config, fp32):
    python recipes/benchmarks/bench_collection.py
GPU (GPT-2 small, B=8, T=512, bf16 autocast; target: stats only <= 1.15x the step time):
    python recipes/benchmarks/bench_collection.py --device cuda --model gpt2-small --batch 8 --seq 512 --bf16

Step time = wall time between ``on_step_begin`` and ``on_step_end`` (CUDA synchronized; includes the
collection callback's work), after ``--warmup`` steps. Variants are interleaved over ``--rounds`` rounds
(in an order rotated every round) so that load from other processes and the page cache hit all of them alike; the CSV reports the minimum (best, least
disturbed; ratios use it) and the median over all measured steps. On CPU torch uses ``--threads``
threads. Results go to a long-format CSV next to this file (``bench_collection.csv``; ``--out``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

CONFIGS = _common.GPT2_SIZES
# variant -> collection flags (None: no collection)
VARIANTS: dict[str, dict | None] = {
    "none": None,
    "stats": {"gradient_collection_save": "stats"},
    "norms_disk": {"gradient_collection_save": "norms"},
    "full_disk": {"gradient_collection_save": "full"},
    # the same without the shard checksums (hf_gradext.store.shards.WRITE_CHECKSUMS off): what they cost
    "full_disk_nocrc": {"gradient_collection_save": "full"},
    "loop_stats": {
        "gradient_collection_save": "stats",
        "gradient_collection_mode": "separate",
        "gradient_collection_method": "loop",
    },
}


def dd_write_speed(directory: Path, mib: int) -> float:
    """Sequential write speed of ``directory``'s disk in MiB/s (``dd`` with fdatasync)."""
    target = directory / "dd_probe.bin"
    try:
        proc = subprocess.run(
            ["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={mib}", "conv=fdatasync"],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        target.unlink(missing_ok=True)
    # e.g. "268435456 bytes (268 MB, 256 MiB) copied, 0.52 s, 516 MB/s"
    match = re.search(r"copied, ([\d.,]+) s", proc.stderr)
    if not match:
        raise RuntimeError(f"could not parse dd output: {proc.stderr!r}")
    seconds = float(match.group(1).replace(",", "."))
    return mib / seconds


def run_variant(
    name: str, flags: dict | None, args: argparse.Namespace, workdir: Path
) -> dict[str, list[float]]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback

    from hf_gradext import GradExtArguments, GradExtTrainer

    torch.manual_seed(0)
    cfg = GPT2Config(**CONFIGS[args.model], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(0)
    steps = args.warmup + args.steps
    rows = []
    for i in range(args.batch * steps):
        ids = torch.randint(0, cfg.vocab_size, (args.seq,), generator=g)
        rows.append({"input_ids": ids, "labels": ids.clone(), "example_id": torch.tensor(i)})
    cuda = args.device == "cuda"
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            _common.sync(args.device)
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            _common.sync(args.device)
            times.append(time.perf_counter() - self.t0)

    out = workdir / name
    kw = dict(
        output_dir=str(out),
        per_device_train_batch_size=args.batch,
        max_steps=steps,
        learning_rate=1e-4,
        report_to=[],
        logging_steps=10**6,
        save_strategy="no",
        use_cpu=not cuda,
        bf16=args.bf16,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    if flags is not None:
        kw.update(
            collect_gradients=True,
            gradient_collection_steps=1,
            gradient_collection_max_samples=args.batch,
            gradient_collection_layers=args.layers,
            gradient_collection_memory_budget_mb=args.budget_mb,
            **flags,
        )
    from hf_gradext.store import shards

    shards.WRITE_CHECKSUMS = not name.endswith("_nocrc")
    trainer = GradExtTrainer(model=model, args=GradExtArguments(**kw), train_dataset=rows)
    trainer.add_callback(Timer())
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for quiet in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(quiet)
    # The collection callback is registered first, so the timer's on_step_end includes its work.
    trainer.train()
    shards.WRITE_CHECKSUMS = True
    result = {"step_time_s": times[args.warmup :]}
    sinks = [getattr(cb, "sink", None) for cb in trainer.callback_handler.callbacks]
    writers = [s.writer for s in sinks if s is not None]
    if writers:
        writing = sum(w.seconds_writing for w in writers)
        hashing = sum(w.seconds_checksumming for w in writers)
        result["shard_write_s"] = [writing]
        result["checksum_cpu_s"] = [hashing]
        result["checksum_cpu_share_of_write"] = [hashing / writing if writing else 0.0]
    logs = [h for h in trainer.state.log_history if "grad_collection/peak_memory_mb" in h]
    if logs:
        result["collection_peak_extra_mb"] = [max(h["grad_collection/peak_memory_mb"] for h in logs)]
    gdir = out / "gradients"
    if gdir.is_dir():
        total = sum(p.stat().st_size for p in gdir.glob("*.safetensors"))
        result["bytes_per_step_mb"] = [total / steps / 2**20]
    shutil.rmtree(out, ignore_errors=True)
    return result


def _timer_totals(r: dict[str, list[float]]) -> dict[str, float]:
    if "shard_write_s" not in r:
        return {}
    writing, hashing = (sum(r[k]) for k in ("shard_write_s", "checksum_cpu_s"))
    return {
        "shard_write_s": writing,
        "checksum_cpu_s": hashing,
        "checksum_cpu_share_of_write": hashing / writing if writing else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--model", default="tiny", choices=tuple(CONFIGS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--steps", type=int, default=4, help="measured optimizer steps per variant and round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the variants")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs)")
    p.add_argument("--layers", default="attn,mlp", help="--gradient_collection_layers")
    p.add_argument("--budget-mb", type=float, default=4096.0, help="--gradient_collection_memory_budget_mb")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--dd-mib", type=int, default=256, help="size of the dd write probe")
    p.add_argument("--workdir", default=None, help="where shards go (the disk being measured)")
    p.add_argument("--out", default=str(Path(__file__).with_suffix(".csv")))
    args = p.parse_args(argv)

    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_collection_"))
    workdir.mkdir(parents=True, exist_ok=True)
    disk = dd_write_speed(workdir, args.dd_mib)
    config = json.dumps(
        {
            "model": args.model,
            "batch": args.batch,
            "seq": args.seq,
            "bf16": args.bf16,
            "layers": args.layers,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "every": 1,
            "threads": args.threads if args.device == "cpu" else None,
            "budget_mb": args.budget_mb,
        }
    )
    base = {"benchmark": "collection", **_common.run_metadata(args.device, cpu_cores=True), "config": config}
    records = [_common.row(base, "disk", "dd_seq_write", disk, "MiB/s")]
    names = args.variants.split(",")
    raw: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    for round_ in range(args.rounds):
        # Rotate the order every round: a variant run right after one that wrote a lot inherits its dirty
        # page writeback (measured: the second of two disk variants wrote 2x slower, whichever it was).
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            for metric, values in run_variant(name, VARIANTS[name], args, workdir).items():
                raw[name].setdefault(metric, []).extend(values)
            print(f"round {round_} {name}: {raw[name]['step_time_s'][-args.steps :]}", flush=True)
    results = {
        name: {
            "step_time_min_s": min(r["step_time_s"]),
            "step_time_median_s": statistics.median(r["step_time_s"]),
            # shard-writer timers: summed over rounds (a ratio of sums, not the worst round)
            **{
                m: max(v)
                for m, v in r.items()
                if m != "step_time_s" and not m.startswith(("shard_", "checksum_"))
            },
            **_timer_totals(r),
        }
        for name, r in raw.items()
    }
    plain = results.get("none", {}).get("step_time_min_s")
    plain_median = results.get("none", {}).get("step_time_median_s")
    for name, res in results.items():
        for metric, value in res.items():
            unit = (
                "s" if metric.endswith("_s") else "fraction" if metric.endswith("_share_of_write") else "MiB"
            )
            records.append(_common.row(base, name, metric, value, unit))
        if plain:
            ratio = res["step_time_min_s"] / plain
            records.append(_common.row(base, name, "step_time_ratio_min", ratio, "x"))
            ratio = res["step_time_median_s"] / plain_median
            records.append(_common.row(base, name, "step_time_ratio_median", ratio, "x"))
        if "bytes_per_step_mb" in res:
            rate = res["bytes_per_step_mb"] / res["step_time_min_s"]
            records.append(_common.row(base, name, "write_rate", rate, "MiB/s"))
            records.append(_common.row(base, name, "write_rate_vs_dd", rate / disk, "fraction"))
    out = _common.write_csv(args.out, records, append=True)
    for r in records:
        print(f"{r['variant']:<11} {r['metric']:<26} {r['value']:>12.4g} {r['unit']}")
    print(f"appended {len(records)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
