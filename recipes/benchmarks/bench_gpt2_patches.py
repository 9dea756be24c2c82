"""Question: how much faster does GPT-2 train with hf_gradext's patches, and what does the mask cache buy?

Part 1 (``patches``): one training step (forward + backward + AdamW) of
  stock | mask_cache | rms_norm | swiglu | all (mask_cache + rms_norm + swiglu) [| all_compile]
at equal parameter count (SwiGLU width round(8d/3)). Variants are timed round-robin (rep 1 of every
variant, then rep 2, ...) so slow drift of the machine hits all of them alike; each rep is the mean
of ``--steps`` steps; we report median, min, max, q1, q3 of the reps, tokens/s from the median, and
peak allocator memory (CUDA only: on CPU, process RSS cannot be split per variant, so none is reported).

Part 2 (``mask``): stock vs cached mask creation for eager and sdpa, with no attention_mask and with an
all-ones attention_mask: host-device syncs per forward (counted, device-independent), microseconds per
``create_causal_mask`` call, and the training-step time of the stock model with and without the cache.

CPU, tiny config (what runs in CI machines):
    python recipes/benchmarks/bench_gpt2_patches.py
CUDA, GPT-2 small, bf16, T=1024:
    python recipes/benchmarks/bench_gpt2_patches.py --device cuda --model gpt2-small --seq 1024 --batch 4 --bf16 --compile
Writes a long-format CSV next to this script (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import _common
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers import masking_utils as hf_masking

from hf_gradext.patches import apply_gradext_to_gpt2, gpt2_models, mask_cache
from hf_gradext.patches.sync_count import HostSyncCounter

MODELS = {
    "tiny": dict(n_layer=2, n_embd=96, n_head=4, vocab_size=2048),
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257),
}
VARIANTS = {  # name -> (causal_mask_cache, rms_norm, swiglu, compile)
    "stock": (False, False, False, False),
    "mask_cache": (True, False, False, False),
    "rms_norm": (False, True, False, False),
    "swiglu": (False, False, True, False),
    "all": (True, True, True, False),
    "all_compile": (True, True, True, True),
}


def _build(opts: argparse.Namespace, rms_norm: bool, swiglu: bool, attn: str) -> GPT2LMHeadModel:
    apply_gradext_to_gpt2(causal_mask_cache=False, rms_norm=rms_norm, swiglu=swiglu)  # class level
    config = GPT2Config(
        **MODELS[opts.model], n_positions=max(1024, opts.seq), use_cache=False, bos_token_id=0, eos_token_id=0
    )
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).to(opts.device).train()
    gpt2_models.uninstall_class_level_patches()
    return model


class Runner:
    """One model + optimizer + fixed batch; ``step()`` is one training step."""

    def __init__(self, opts: argparse.Namespace, name: str, attn: str = "sdpa", attention_mask: bool = False):
        cache, rms_norm, swiglu, compiled = VARIANTS[name]
        self.device = torch.device(opts.device)
        self.cache, self.bf16 = cache, opts.bf16
        self.model = _build(opts, rms_norm, swiglu, attn)
        self.params = sum(p.numel() for p in self.model.parameters())
        fused = self.device.type == "cuda"
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=fused)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, self.model.config.vocab_size, (opts.batch, opts.seq), generator=g)
        self.batch = {"input_ids": ids.to(self.device), "labels": ids.to(self.device)}
        if attention_mask:
            self.batch["attention_mask"] = torch.ones_like(self.batch["input_ids"])
        self.forward = torch.compile(self.model) if compiled else self.model

    def step(self) -> None:
        (mask_cache.install_mask_cache if self.cache else mask_cache.uninstall_mask_cache)()
        with _common.autocast(self.device.type, self.bf16):
            loss = self.forward(**self.batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def bench_patches(opts: argparse.Namespace, emit) -> None:
    names = [n for n in VARIANTS if opts.compile or not VARIANTS[n][3]]
    runners: dict[str, Runner] = {}
    for name in names:
        try:
            runner = Runner(opts, name)
            if opts.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for _ in range(opts.warmup):
                runner.step()
            _common.sync(opts.device)
            if opts.device == "cuda":
                emit("patches", name, "peak_memory", torch.cuda.max_memory_allocated() / 2**30, "GiB")
            runners[name] = runner
            emit("patches", name, "parameters", runner.params, "count")
        except Exception as exc:  # e.g. torch.compile without a working toolchain: record, go on
            emit("patches", name, "failed", 1, repr(exc)[:200])
    # One sample = mean ms per step over ``--steps`` steps; variants interleaved rep by rep.
    steps = {name: runner.step for name, runner in runners.items()}
    times = _common.time_interleaved(steps, rounds=opts.reps, inner=opts.steps, device=opts.device)
    tokens = opts.batch * opts.seq
    stock = statistics.median(times["stock"]) if "stock" in times else None
    for name, values in times.items():
        for stat, value in _common.summarize(values, quartiles=True).items():
            emit("patches", name, f"step_time_{stat}", value, "ms")
        median = statistics.median(values)
        emit("patches", name, "tokens_per_s", tokens / median * 1e3, "tokens/s")
        if stock:
            emit("patches", name, "speedup_vs_stock", stock / median, "x")


def _mask_call(config, embeds, attention_mask, seq: int, device: torch.device, cached: bool):
    """One ``create_causal_mask`` call as GPT2Model makes it: default positions (the cached arange when
    the cache is on; stock GPT2Model builds its positions every forward)."""
    if cached:
        positions = mask_cache.default_position_ids(seq, device)
        return lambda: mask_cache.cached_create_causal_mask(config, embeds, attention_mask, None, positions)
    return lambda: hf_masking.create_causal_mask(
        config, embeds, attention_mask, None, torch.arange(seq, device=device)[None]
    )


def bench_mask(opts: argparse.Namespace, emit) -> None:
    device = torch.device(opts.device)
    for attn in ("eager", "sdpa"):
        for mask_kind in ("none", "all_ones"):
            runner = Runner(opts, "stock", attn=attn, attention_mask=mask_kind == "all_ones")
            model, batch = runner.model, runner.batch
            embeds = model.transformer.wte(batch["input_ids"]).detach()  # (B, T, d)
            am = batch.get("attention_mask")
            for label, cached in (("stock", False), ("mask_cache", True)):
                (mask_cache.install_mask_cache if cached else mask_cache.uninstall_mask_cache)()
                variant = f"{attn}/{mask_kind}/{label}"
                with torch.no_grad(), HostSyncCounter() as counter:
                    model(**{k: v for k, v in batch.items() if k != "labels"})
                emit("mask", variant, "host_syncs_per_forward", counter.count, "count")
                create_mask = _mask_call(model.config, embeds, am, opts.seq, device, cached)
                per_call = _common.time_interleaved(
                    {variant: create_mask}, rounds=opts.reps, inner=opts.mask_calls, device=opts.device
                )[variant]  # ms per call
                for stat, value in _common.summarize(per_call, quartiles=True).items():
                    emit("mask", variant, f"mask_call_{stat}", value * 1e3, "us")
                runner.cache = cached
                steps = _common.time_interleaved(
                    {variant: runner.step},
                    rounds=opts.reps,
                    inner=opts.steps,
                    warmup=opts.warmup,
                    device=opts.device,
                )[variant]  # ms per step
                for stat, value in _common.summarize(steps, quartiles=True).items():
                    emit("mask", variant, f"step_time_{stat}", value, "ms")
            mask_cache.uninstall_mask_cache()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="tiny", choices=sorted(MODELS))
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--compile", action="store_true", help="add the torch.compile variant of 'all'")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions per variant")
    p.add_argument("--steps", type=int, default=5, help="training steps per repetition")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per variant")
    p.add_argument("--mask_calls", type=int, default=200, help="mask creations per timed repetition")
    p.add_argument("--parts", default="patches,mask")
    p.add_argument("--out", default=str(Path(__file__).with_suffix(".csv")))
    opts = p.parse_args(argv)
    if opts.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    config = json.dumps(
        {k: getattr(opts, k) for k in ("model", "seq", "batch", "bf16", "reps", "steps", "warmup")}
        | {"threads": torch.get_num_threads()}
    )
    common = {**_common.run_metadata(opts.device), "config": config}
    rows: list[dict] = []

    def emit(benchmark: str, variant: str, metric: str, value: float, unit: str) -> None:
        rows.append(_common.row({"benchmark": benchmark, **common}, variant, metric, round(value, 4), unit))
        print(f"{benchmark:8s} {variant:26s} {metric:24s} {value:12.4f} {unit}", flush=True)

    parts = opts.parts.split(",")
    if "patches" in parts:
        bench_patches(opts, emit)
    if "mask" in parts:
        bench_mask(opts, emit)
    out = _common.write_csv(opts.out, rows)
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
