"""Question: what does Kronecker gradient projection cost, and how much faster is it than TRAK-style
materialize-then-project?

Variants (all on the same batch, timed round-robin over ``--rounds`` so machine drift hits all alike):
  plain_fwd_bwd        forward + backward (ordinary weight grads)
  plain_train_step     forward + backward + AdamW step
  train_step_proj      the same with every block Linear/Conv1D projected at --rank per layer from the
                       training backward (what --project_gradients does per microbatch)
  dataset_pass_proj    KroneckerProjector.project: forward + backward with no ordinary weight grads
                       (what `hf-gradext project` does per batch)
  materialize_dense    exact per-sample gradients of the same layers (hf_gradext.grad.per_sample_gradients)
                       then a dense Gaussian projection per layer to the same dimension (TRAK-style);
                       the dense matrices are precomputed when they fit in --dense_max_gb, else generated
                       chunk by chunk from a seed on every call (no storage, as TRAK's kernel)
Targets on a GPU (GPT-2 small, B=8, T=512, bf16): train_step_proj <= 1.15x plain_train_step,
dataset_pass_proj <= 1.10x plain_fwd_bwd.

CPU, tiny config (what runs here):
    python recipes/benchmarks/bench_projection.py
CUDA, GPT-2 small (random init), bf16 autocast:
    python recipes/benchmarks/bench_projection.py --device cuda --model gpt2-small --batch 8 --seq 512 --bf16
Writes a long-format CSV next to this script (``bench_projection.csv``; ``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import _common
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_gradext.grad import per_sample_gradients
from hf_gradext.projection import KroneckerProjector
from hf_gradext.projection.projector import causal_lm_loss

CONFIGS = _common.GPT2_SIZES


class DenseBaseline:
    """Per-layer dense Gaussian projection of materialized per-sample gradients (k = --rank per layer)."""

    def __init__(self, projector: KroneckerProjector, device: str, dtype: torch.dtype, max_gb: float) -> None:
        self.blocks = projector.blocks
        self.device, self.dtype = device, dtype
        self.k = [b.k_i * b.k_o for b in self.blocks]
        sizes = [b.d_in * b.d_out for b in self.blocks]
        gb = sum(s * k for s, k in zip(sizes, self.k)) * torch.finfo(dtype).bits / 8 / 1e9
        self.stored = gb <= max_gb
        self.mode = "stored" if self.stored else "generated"
        self.mats = []
        if self.stored:
            gen = torch.Generator(device=device).manual_seed(0)
            for s, k in zip(sizes, self.k):
                self.mats.append(torch.randn(s, k, generator=gen, device=device, dtype=dtype) / math.sqrt(k))

    def __call__(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        out = []
        gen = torch.Generator(device=self.device).manual_seed(0)
        for i, b in enumerate(self.blocks):
            g = grads[b.weight_name].reshape(grads[b.weight_name].shape[0], -1).to(self.dtype)  # (B, P_l)
            if self.stored:
                out.append(g @ self.mats[i])
                continue
            acc = torch.zeros(g.shape[0], self.k[i], device=self.device, dtype=torch.float32)
            chunk = max(1, (1 << 26) // self.k[i])
            for s in range(0, g.shape[1], chunk):
                r = torch.randn(
                    min(chunk, g.shape[1] - s), self.k[i], generator=gen, device=self.device, dtype=self.dtype
                )
                acc += (g[:, s : s + r.shape[0]] @ r).float()
            out.append(acc / math.sqrt(self.k[i]))
        return torch.cat([o.float() for o in out], 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", choices=list(CONFIGS), default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=256, help="projection dimension per layer")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=3, help="timed calls per variant per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dense_max_gb", type=float, default=4.0)
    p.add_argument("--out", default=str(Path(__file__).with_suffix(".csv")))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = args.device
    cfg = GPT2Config(**CONFIGS[args.model], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).to(dev)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen).to(dev)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def amp():
        return _common.autocast(dev, args.bf16)

    projector = KroneckerProjector(model, layers="attn,mlp", rank_total=args.rank, rank_min=8)
    train_engine = projector.make_engine(weight_grads=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev.startswith("cuda"))
    dense = DenseBaseline(projector, dev, torch.bfloat16 if args.bf16 else torch.float32, args.dense_max_gb)
    block_layers = projector.capture_layers()

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        with amp():
            causal_lm_loss(model(**inputs).logits, batch["labels"]).backward()

    def train_step() -> None:
        fwd_bwd()
        opt.step()

    def train_step_proj() -> None:
        model.zero_grad(set_to_none=True)
        with amp(), train_engine.capture(projector.loss_scale(batch)):
            causal_lm_loss(model(**inputs).logits, batch["labels"]).backward()
        projector.collect()
        opt.step()

    def dataset_pass() -> None:
        with amp():
            projector.project(batch)

    def materialize() -> None:
        with amp():
            grads = per_sample_gradients(model, batch, layers=block_layers, dtype=dense.dtype)
        dense(grads)

    variants = {
        "plain_fwd_bwd": fwd_bwd,
        "plain_train_step": train_step,
        "train_step_proj": train_step_proj,
        "dataset_pass_proj": dataset_pass,
        "materialize_dense": materialize,
    }
    peak: dict[str, float] = {}

    def reset_peak(name: str) -> None:
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()

    def read_peak(name: str) -> None:
        if dev.startswith("cuda"):
            peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**20)

    times = _common.time_interleaved(
        variants,
        rounds=args.rounds,
        reps=args.reps,
        warmup=args.warmup,
        device=dev,
        before_round=reset_peak,
        after_round=read_peak,
    )
    tokens = args.batch * args.seq
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    base = {
        "train_step_proj": "plain_train_step",
        "dataset_pass_proj": "plain_fwd_bwd",
        "materialize_dense": "plain_fwd_bwd",
        "plain_train_step": "plain_fwd_bwd",
    }
    config = json.dumps(
        {
            "model": args.model,
            "batch": args.batch,
            "seq": args.seq,
            "rank_per_layer": args.rank,
            "layers": len(projector.blocks),
            "total_dim": projector.dim,
            "bf16": args.bf16,
            "threads": args.threads,
            "dense_matrices": dense.mode,
            "rounds": args.rounds,
            "reps": args.reps,
        },
        sort_keys=True,
    )
    common = {"benchmark": "projection", **_common.run_metadata(dev, timestamp=True), "config": config}
    rows = []

    def add(variant: str, metric: str, value: str, unit: str) -> None:
        rows.append(_common.row(common, variant, metric, value, unit))

    for name in variants:
        add(name, "time_min", f"{best[name]:.3f}", "ms")
        add(name, "time_median", f"{med[name]:.3f}", "ms")
        add(name, "tokens_per_s", f"{tokens / best[name] * 1e3:.1f}", "tokens/s")
        if name in base:
            add(name, f"ratio_to_{base[name]}", f"{best[name] / best[base[name]]:.3f}", "x")
        if name in peak:
            add(name, "peak_memory", f"{peak[name]:.1f}", "MiB")
    speedup = best["materialize_dense"] / best["dataset_pass_proj"]
    add("dataset_pass_proj", "speedup_over_materialize_dense", f"{speedup:.2f}", "x")
    out = _common.write_csv(args.out, rows)
    for r in rows:
        print(f"{r['variant']:<20} {r['metric']:<32} {r['value']:>10} {r['unit']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
