"""Benchmark: what do exact per-sample gradients cost, relative to a plain forward+backward?

Question: time and peak memory of hf_gradext's capture engine (block Linear/Conv1D layers; all
parameters with sparse embeddings; norms only) versus torch.func vmap, Opacus and a Python loop over
samples, all as ratios to a plain forward+backward of the same batch.

CPU (what CI / a laptop runs; tiny config, fp32):
    python recipes/benchmarks/bench_per_sample_grads.py
GPU (GPT-2 small, B=8, T=512, bf16 autocast; targets: blocks <= 1.15x, norms <= 1.10x, all <= 1.4x,
>= 3x faster than Opacus):
    python recipes/benchmarks/bench_per_sample_grads.py --device cuda --model gpt2-small --batch 8 --seq 512 --bf16

Times: medians over ``--reps`` steps after ``--warmup``, all variants interleaved round-robin in one
process (each on its own model copy), so a noisy shared CPU hits them alike. Peak memory: each variant
alone in a subprocess: on CUDA ``torch.cuda.max_memory_allocated`` during one step after a warm-up step,
minus what was allocated before it; on CPU the peak of current RSS (polled) during the first step over RSS before it,
with glibc told to mmap allocations >= 16 KiB (coarse: page granularity, includes lazy one-time buffers). Results go to a long-format CSV next to this file.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _common

VARIANTS = (
    "plain",
    "engine_blocks",
    "engine_all_sparse",
    "engine_norms",
    "engine_norms_no_weight_grads",
    "torch_func_vmap",
    "opacus",
    "loop",
)
CONFIGS = _common.GPT2_SIZES


def _build(args):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(**CONFIGS[args.model], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).to(args.device).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(args.device)
    return model, {"input_ids": ids, "labels": ids.clone()}


def _materialize(engine):
    from hf_gradext.grad.factors import materialize_sum

    return {n: materialize_sum(cs) for n, cs in engine.contributions().items()}


def _sq_norms(engine):
    from hf_gradext.grad.factors import sq_norms

    return sum(sq_norms(cs) for cs in engine.contributions().values())  # (B,)


def _variant_step(name, model, batch, amp):
    """A closure doing one measured step of ``name`` and returning what it produces."""
    import torch

    if name == "plain":

        def step():
            model.zero_grad(set_to_none=True)
            with amp():
                loss = model(**batch).loss
            loss.backward()

        return step
    if name.startswith("engine_"):
        from hf_gradext.grad import CaptureEngine

        # engine_norms*: per-sample gradient norms of the block layers (ghost identity where cheaper,
        # no per-sample gradient built); *_no_weight_grads skips the ordinary .grad (a measurement pass).
        layers = "all" if name == "engine_all_sparse" else "attn,mlp"
        norms_only = name.startswith("engine_norms")
        engine = CaptureEngine(model, layers, weight_grads=not name.endswith("_no_weight_grads"))

        def step():
            model.zero_grad(set_to_none=True)
            with engine.capture(batch):
                with amp():
                    loss = model(**batch).loss
                loss.backward()
            if norms_only:
                return _sq_norms(engine)
            return _materialize(engine)

        return step
    if name == "torch_func_vmap":
        from torch.func import functional_call, grad, vmap

        params = {k: p.detach() for k, p in model.named_parameters()}

        def loss_fn(prm, ids):
            with amp():
                out = functional_call(model, prm, (ids.unsqueeze(0),), {"labels": ids.unsqueeze(0)})
            return out.loss

        f = vmap(grad(loss_fn), in_dims=(None, 0))
        return lambda: f(params, batch["input_ids"])
    if name == "opacus":
        import copy

        from opacus import GradSampleModule

        gsm = GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="mean", strict=False)

        def step():
            gsm.zero_grad(set_to_none=True)
            with amp():
                loss = gsm(**batch).loss
            loss.backward()
            return [p.grad_sample for p in gsm.parameters() if getattr(p, "grad_sample", None) is not None]

        return step
    if name == "loop":

        def step():
            out = []
            for i in range(batch["input_ids"].shape[0]):
                model.zero_grad(set_to_none=True)
                with amp():
                    loss = model(
                        input_ids=batch["input_ids"][i : i + 1], labels=batch["labels"][i : i + 1]
                    ).loss
                loss.backward()
                out.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
            return out

        return step
    raise ValueError(name)


def _nbytes(obj) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if hasattr(obj, "values") and hasattr(obj, "row_idx"):  # SparseRowGrad
        return sum(_nbytes(t) for t in (obj.values, obj.row_idx, obj.sample_idx))
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_nbytes(v) for v in obj)
    return 0


def _amp(args):
    """A factory of fresh autocast contexts for this run (bf16 or none)."""
    return functools.partial(_common.autocast, args.device, args.bf16)


class _RssSampler:
    """Current RSS (``/proc/self/statm``) polled every ~0.5 ms in a thread: CPU peak over a step."""

    def __enter__(self):
        import threading

        self._page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def run_memory(args) -> dict:
    """Peak memory of one variant, alone in this (sub)process: 1 warm-up + 1 measured step."""
    import torch

    torch.manual_seed(0)
    model, batch = _build(args)
    cuda = args.device == "cuda"
    step = _variant_step(args.only, model, batch, _amp(args))
    if cuda:  # CUDA: warm up (cuBLAS workspaces, allocator); CPU: RSS never drops, measure the first step
        step()
        _common.sync(args.device)
    if cuda:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = step()
        _common.sync(args.device)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with _RssSampler() as rss:
            out = step()
        peak = rss.peak - rss.base
    returned = _nbytes(out)
    return {"peak_mb": peak / 2**20, "returned_mb": returned / 2**20}


def run_times(args, variants: list[str]) -> dict[str, float]:
    """Median step time per variant, interleaved round-robin in one process (fair under shared CPUs);
    each variant gets its own copy of the model so hooks of one never run in another."""
    import copy

    import torch

    torch.manual_seed(0)
    model, batch = _build(args)
    steps = {v: _variant_step(v, copy.deepcopy(model), batch, _amp(args)) for v in variants}
    times = _common.time_interleaved(steps, rounds=args.reps, warmup=args.warmup, device=args.device)
    return {v: statistics.median(t) for v, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="tiny", choices=sorted(CONFIGS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default=str(Path(__file__).with_suffix(".csv")))
    p.add_argument("--only", help=argparse.SUPPRESS)  # internal: measure one variant, print JSON
    args = p.parse_args(argv)
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.only:
        print(json.dumps(run_memory(args)))
        return 0

    variants = args.variants.split(",")
    timed = run_times(args, variants)
    results = {}
    for v in variants:
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--only", v]
        # glibc: serve every allocation >= 16 KiB by mmap so freed memory leaves RSS and peaks are real.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "16384"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"{v}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        results[v] = {"time_ms": timed[v], **json.loads(proc.stdout.strip().splitlines()[-1])}
        print(v, results[v], flush=True)
    plain = results.get("plain")
    config = json.dumps(
        {"model": args.model, "batch": args.batch, "seq": args.seq, "bf16": args.bf16, "reps": args.reps}
    )
    common = {"benchmark": "per_sample_grads", **_common.run_metadata(args.device), "config": config}
    rows = []
    for v, r in results.items():
        metrics = [
            ("time", r["time_ms"], "ms"),
            ("peak_mem", r["peak_mb"], "MiB"),
            ("returned", r["returned_mb"], "MiB"),
        ]
        if plain:
            metrics += [("time_ratio", r["time_ms"] / plain["time_ms"], "x_plain")]
            if plain["peak_mb"] > 0:
                metrics += [("peak_mem_ratio", r["peak_mb"] / plain["peak_mb"], "x_plain")]
        rows += [_common.row(common, v, m, f"{val:.4g}", u) for m, val, u in metrics]
    _common.write_csv(args.out, rows)  # atomic: never leaves a half-written CSV
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
