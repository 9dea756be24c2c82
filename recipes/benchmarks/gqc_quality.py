"""Question: at the SAME data budget, does GQC reach a lower eval loss than fixed gradient accumulation?

Setup (identical for every variant): the embedded default corpus (``hf_gradext.data``), its local BPE
tokenizer, blocks of ``SEQ`` tokens, microbatches of ``BATCH`` blocks, one model initialization (built
once, copied into every run), the same seed, hence the same microbatch stream (checked: the script
hashes every microbatch's ``input_ids`` and refuses to write results if two variants saw different
streams), AdamW (betas 0.9, 0.95) with the same peak LR, cosine decay with a linear warmup over the
first ``WARMUP`` fraction of the data, dropout as in the built-in config, gradient clipping at
``QUALITY_MAX_GRAD_NORM`` (HF's default 1.0; applied once to each step's final mean gradient). With
``QUALITY_MAX_GRAD_NORM=0`` large windows hit Adam loss spikes whose huge gradient then freezes Adam's
second moment for a hundred steps (``gqc_quality_noclip.csv``, docs/gqc.md).

Data budget: ``EPOCHS`` passes over a train set trimmed to a multiple of ``BATCH x 4`` blocks, so every
variant consumes exactly ``N = EPOCHS x microbatches_per_epoch`` microbatches and fixed accumulation 4
never takes a short step at an epoch end.

LR horizon over data (the same curve for all):
  fixed accumulation GA   HF's scheduler over ``N / GA`` optimizer steps (warmup ``ceil(WARMUP x N / GA)``
                          steps); the window that starts at microbatch ``m`` uses lr(m / N).
  GQC (gnts, sbc)         the scheduler's horizon is ``N`` microbatches (``GradExtTrainer.create_scheduler``)
                          and it is advanced by the microbatches each step consumed, so the window that
                          starts at microbatch ``m`` also uses lr(m / N).

Variants: fixed_ga1, fixed_ga4; gnts relative 0.5 and 0.8 (threshold = value x EMA of the single-
microbatch gradient norm); gnts absolute with a threshold = ``ABS_FRACTION`` x the median single-microbatch
gradient norm measured in the fixed_ga1 run (so fixed_ga1 runs first); sbc with a logical batch that grows
linearly over the data from ``BATCH`` samples (1 microbatch) to ``8 x BATCH`` samples (8 microbatches).
GQC variants are capped at ``CAP`` microbatches per step; each is bounded by ``--gqc_microbatch_budget N``.

Evaluation at equal data: after every ``N / 16`` microbatches (and before training) the mean token loss on
the whole validation split. The check runs after the microbatch that reaches the mark, whether or not
that microbatch closed a window: a GQC window still open at a mark has consumed its data but not stepped
on it yet (that is what GQC costs at equal data). The last mark always coincides with a step (the end of
the budget forces one).

CPU, tiny config (default):  python recipes/benchmarks/gqc_quality.py
  (QUALITY_THREADS=1 torch threads by default; QUALITY_EPOCHS, QUALITY_VARIANTS=a,b,... override;
  QUALITY_TRAIN_BLOCKS / QUALITY_EVAL_BLOCKS cap the data for a quick smoke run, as the tests do)
CUDA, GPT-2 small, bf16:     QUALITY_DEVICE=cuda python recipes/benchmarks/gqc_quality.py
Writes gqc_quality.csv (long format, one row per variant x eval point) and gqc_quality.png next to this
script (``_cuda`` suffix on CUDA; ``QUALITY_OUT=/path/stem`` writes elsewhere).
"""

from __future__ import annotations

import copy
import csv
import datetime
import hashlib
import math
import os
import statistics
import tempfile
import textwrap
import time
from typing import Any

import torch
import transformers
from transformers import TrainerCallback, default_data_collator

from hf_gradext.arguments import GradExtArguments
from hf_gradext.data import build_datasets, load_tokenizer
from hf_gradext.models import build_config
from hf_gradext.trainer import GradExtTrainer

HERE = os.path.dirname(os.path.abspath(__file__))
DEVICE = os.environ.get("QUALITY_DEVICE", "cpu")
CUDA = DEVICE == "cuda"
CONFIG_NAME = "small" if CUDA else "tiny"
BATCH, SEQ = 8, 128
EPOCHS = int(os.environ.get("QUALITY_EPOCHS", 5))
LR, WARMUP, WEIGHT_DECAY = (6e-4 if CUDA else 3e-3), 0.05, 0.1
CAP = 16
MAX_GRAD_NORM = float(os.environ.get("QUALITY_MAX_GRAD_NORM", 1.0))
TRAIN_BLOCKS = int(os.environ.get("QUALITY_TRAIN_BLOCKS", 0))  # 0: all train blocks
EVAL_BLOCKS = int(os.environ.get("QUALITY_EVAL_BLOCKS", 0))  # 0: the whole validation split
ABS_FRACTION = 1.0
EVAL_POINTS = 16  # eval every N / EVAL_POINTS microbatches; the table reads 4, 8, 12, 16
ALL_VARIANTS = ("fixed_ga1", "fixed_ga4", "gnts_rel0.5", "gnts_rel0.8", "gnts_abs", "sbc_8to64")
VARIANTS = tuple(v for v in os.environ.get("QUALITY_VARIANTS", ",".join(ALL_VARIANTS)).split(",") if v)
if not CUDA:
    torch.set_num_threads(int(os.environ.get("QUALITY_THREADS", 1)))
CSV_FIELDS = (
    "benchmark",
    "variant",
    "tokens",
    "microbatches",
    "fraction",
    "eval_loss",
    "optimizer_steps",
    "mean_microbatches_per_step",
    "lr_horizon",
    "threshold",
    "seconds",
    "device",
    "torch",
    "transformers",
    "date",
    "config",
)


# ---------------------------------------------------------------------- data + model
def _base_args(out: str, **overrides: Any) -> GradExtArguments:
    kwargs: dict[str, Any] = dict(
        output_dir=out,
        config_name=CONFIG_NAME,
        block_size=SEQ,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=WARMUP,  # a fraction: of optimizer steps (fixed GA) or of microbatches (GQC)
        weight_decay=WEIGHT_DECAY,
        adam_beta2=0.95,  # nanoGPT / the H100 anchor; 0.999 spiked with few large-window steps here
        max_grad_norm=MAX_GRAD_NORM,  # HF default 1.0; GQC clips the final mean gradient once
        logging_steps=10**9,  # this script records what it needs itself; keep stdout readable
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=not CUDA,
        bf16=CUDA,
        seed=0,
    )
    kwargs.update(overrides)
    return GradExtArguments(**kwargs)


def build_data(out: str):
    """Tokenizer, train blocks trimmed to a multiple of BATCH x 4, all validation blocks."""
    args = _base_args(out)
    tok = load_tokenizer(args)
    train, evals = build_datasets(args, tok, block_size=SEQ)
    keep = len(train) // (BATCH * 4) * (BATCH * 4)
    if TRAIN_BLOCKS:  # a smaller budget (smoke runs); still a multiple of BATCH x 4
        keep = min(keep, max(BATCH * 4, TRAIN_BLOCKS // (BATCH * 4) * (BATCH * 4)))
    if EVAL_BLOCKS:
        evals = evals.select(range(min(len(evals), EVAL_BLOCKS)))
    return tok, train.select(range(keep)), evals


@torch.no_grad()
def eval_loss(model, eval_ds, device) -> float:
    """Token-weighted mean next-token loss over the whole validation split."""
    was_training = model.training
    model.eval()
    ids = torch.tensor(eval_ds["input_ids"], device=device)  # (E, T)
    total, count = 0.0, 0
    for chunk in ids.split(32):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=CUDA):
            loss = model(input_ids=chunk, labels=chunk).loss.float()
        n = chunk[:, 1:].numel()  # blocks are full: every shifted label counts
        total += float(loss) * n
        count += n
    model.train(was_training)
    return total / count


# ---------------------------------------------------------------------- equal-data evaluation
class EqualDataEval(TrainerCallback):
    """Microbatch observer + callback: counts microbatches and evaluates at fixed data marks.

    ``after_microbatch`` (inside ``training_step``) counts the microbatch and hashes its ids; the
    ``on_substep_end`` / ``on_step_end`` that follows (after the optimizer step, if any) evaluates
    when the count reached the next mark.
    """

    def __init__(self, trainer, eval_ds, marks: list[int], measure_norms: bool = False) -> None:
        self.trainer, self.eval_ds, self.marks = trainer, eval_ds, marks
        self.measure_norms = measure_norms
        self.microbatches = 0
        self.tokens = 0
        self.in_steps = 0  # microbatches in closed windows
        self.norms: list[float] = []
        self.stream = hashlib.sha256()
        self.points: list[dict[str, float]] = []
        self._next = 0

    # observer
    def before_microbatch(self, trainer, inputs, num_items_in_batch) -> None:
        pass

    def after_microbatch(self, trainer, inputs, loss) -> None:
        ids = inputs["input_ids"]
        self.microbatches += 1
        self.tokens += int(ids.numel())
        self.stream.update(ids.cpu().numpy().tobytes())
        if self.measure_norms:  # GA=1: .grad is this microbatch's own mean-token gradient
            grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    # callback
    def record(self, steps: int) -> None:
        model = self.trainer.model
        self.points.append(
            {
                "microbatches": self.microbatches,
                "tokens": self.tokens,
                "eval_loss": eval_loss(model, self.eval_ds, next(model.parameters()).device),
                "optimizer_steps": steps,
                "mean_microbatches_per_step": self.in_steps / steps if steps else float("nan"),
            }
        )

    def _maybe_eval(self, state) -> None:
        while self._next < len(self.marks) and self.microbatches >= self.marks[self._next]:
            self.record(state.global_step)
            self._next += 1

    def on_train_begin(self, args, state, control, **kw):
        self.record(0)

    def on_step_end(self, args, state, control, **kw):
        self.in_steps = self.microbatches
        self._maybe_eval(state)

    def on_substep_end(self, args, state, control, **kw):
        self._maybe_eval(state)


# ---------------------------------------------------------------------- variants
def variant_args(name: str, n: int, abs_threshold: float | None) -> tuple[dict[str, Any], str, str]:
    """(GradExtArguments overrides, LR horizon description, threshold description) of a variant."""
    if name.startswith("fixed_ga"):
        ga = int(name.removeprefix("fixed_ga"))
        horizon = f"HF cosine over {n // ga} optimizer steps (= {n} microbatches), warmup {WARMUP} of them"
        return {"gradient_accumulation_steps": ga}, horizon, f"window {ga}"
    gqc_horizon = f"cosine over {n} microbatches consumed (--gqc_microbatch_budget), warmup {WARMUP} of them"
    common = {"gqc_microbatch_budget": n, "gqc_max_microbatches": CAP}
    if name.startswith("gnts_rel"):
        value = float(name.removeprefix("gnts_rel"))
        kw = {"gqc": "gnts", "gqc_threshold_mode": "relative", "gqc_threshold_start": value}
        return {**common, **kw}, gqc_horizon, f"relative {value} x EMA single-microbatch norm"
    if name == "gnts_abs":
        if abs_threshold is None:
            raise RuntimeError("gnts_abs needs the fixed_ga1 run first (its measured single-microbatch norm)")
        kw = {"gqc": "gnts", "gqc_threshold_mode": "absolute", "gqc_threshold_start": abs_threshold}
        return {**common, **kw}, gqc_horizon, f"absolute {abs_threshold:.4g}"
    if name == "sbc_8to64":
        kw = {
            "gqc": "sbc",
            "gqc_threshold_start": float(BATCH),
            "gqc_threshold_end": float(8 * BATCH),
            "gqc_schedule": "linear",
        }
        return {**common, **kw}, gqc_horizon, f"samples {BATCH} -> {8 * BATCH}, linear over data"
    raise ValueError(f"unknown variant {name!r}; choose from {', '.join(ALL_VARIANTS)}")


def run_variant(name, data, init_model, abs_threshold) -> dict[str, Any]:
    tok, train, evals = data
    n = EPOCHS * len(train) // BATCH
    marks = [n * i // EVAL_POINTS for i in range(1, EVAL_POINTS + 1)]
    overrides, horizon, threshold = variant_args(name, n, abs_threshold)
    with tempfile.TemporaryDirectory() as out:
        args = _base_args(out, num_train_epochs=EPOCHS, **overrides)
        model = copy.deepcopy(init_model)
        trainer = GradExtTrainer(
            model=model,
            args=args,
            train_dataset=train,
            processing_class=tok,
            data_collator=default_data_collator,
        )
        probe = EqualDataEval(trainer, evals, marks, measure_norms=name == "fixed_ga1")
        trainer.add_microbatch_observer(probe)
        trainer.add_callback(probe)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    if probe.microbatches != n or len(probe.points) != EVAL_POINTS + 1:
        raise RuntimeError(
            f"{name}: consumed {probe.microbatches}/{n} microbatches, {len(probe.points)} evals"
        )
    return {
        "name": name,
        "points": probe.points,
        "norms": probe.norms,
        "stream": probe.stream.hexdigest(),
        "horizon": horizon,
        "threshold": threshold,
        "seconds": seconds,
    }


# ---------------------------------------------------------------------- output
def _atomic_write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def plot(results: list[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        pts = r["points"][1:]  # skip the shared initial point: it squashes the y range
        last = r["points"][-1]
        label = (
            f"{r['name']} ({last['optimizer_steps']} steps, {last['mean_microbatches_per_step']:.2f} mb/step)"
        )
        ax.plot([p["tokens"] / 1e6 for p in pts], [p["eval_loss"] for p in pts], marker=".", label=label)
    ax.set_xlabel("training tokens consumed (millions)")
    ax.set_ylabel("eval loss (nats/token, log scale)")
    ax.set_yscale("log")
    ax.set_title(textwrap.fill(title, 110), fontsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def main() -> None:
    with tempfile.TemporaryDirectory() as out:
        data = build_data(out)
        tok, train, evals = data
        config = build_config(_base_args(out), tok)
    torch.manual_seed(0)
    init_model = transformers.GPT2LMHeadModel(config)  # one init, deep-copied into every run
    if CUDA:
        init_model = init_model.cuda()
    n = EPOCHS * len(train) // BATCH
    params = sum(p.numel() for p in init_model.parameters())
    cfg = (
        f"gpt2 {CONFIG_NAME} L{config.n_layer} d{config.n_embd} ({params / 1e6:.2f}M params) vocab{config.vocab_size} "
        f"B{BATCH} T{SEQ} {len(train)} train blocks x {EPOCHS} epochs = {n} microbatches; "
        f"{len(evals)} eval blocks; AdamW(0.9,0.95) lr{LR} wd{WEIGHT_DECAY} cosine warmup{WARMUP} clip{MAX_GRAD_NORM:g}; cap{CAP}; "
        + ("bf16" if CUDA else f"fp32 threads{torch.get_num_threads()}")
    )
    print(cfg, flush=True)
    order = [v for v in ALL_VARIANTS if v in VARIANTS]
    if "gnts_abs" in order and "fixed_ga1" not in order:
        raise SystemExit("gnts_abs needs fixed_ga1 in QUALITY_VARIANTS (its threshold comes from that run)")
    results, abs_threshold = [], None
    for name in order:
        r = run_variant(name, data, init_model, abs_threshold)
        if name == "fixed_ga1":
            abs_threshold = ABS_FRACTION * statistics.median(r["norms"])
            q = statistics.quantiles(r["norms"], n=10)
            print(
                f"  single-microbatch grad norm: median {statistics.median(r['norms']):.4f} "
                f"p10 {q[0]:.4f} p90 {q[-1]:.4f} first {r['norms'][0]:.4f} last {r['norms'][-1]:.4f}",
                flush=True,
            )
        curve = ", ".join(f"{p['eval_loss']:.4f}" for p in r["points"][EVAL_POINTS // 4 :: EVAL_POINTS // 4])
        last = r["points"][-1]
        print(
            f"{name:<12} eval@25/50/75/100%: {curve}  steps {last['optimizer_steps']}  "
            f"mb/step {last['mean_microbatches_per_step']:.2f}  {r['seconds']:.0f}s",
            flush=True,
        )
        results.append(r)
    streams = {r["stream"] for r in results}
    if len(streams) != 1:
        raise SystemExit("variants saw different microbatch streams; results not written")

    common = {
        "benchmark": "gqc_quality",
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.date.today().isoformat(),
        "config": cfg,
    }
    rows = []
    for r in results:
        for p in r["points"]:
            rows.append(
                {
                    **common,
                    "variant": r["name"],
                    "tokens": p["tokens"],
                    "microbatches": p["microbatches"],
                    "fraction": round(p["microbatches"] / n, 4),
                    "eval_loss": round(p["eval_loss"], 5),
                    "optimizer_steps": p["optimizer_steps"],
                    "mean_microbatches_per_step": round(p["mean_microbatches_per_step"], 3)
                    if not math.isnan(p["mean_microbatches_per_step"])
                    else "",
                    "lr_horizon": r["horizon"],
                    "threshold": r["threshold"],
                    "seconds": round(r["seconds"], 1),
                }
            )
    stem = os.environ.get("QUALITY_OUT") or os.path.join(HERE, "gqc_quality" + ("_cuda" if CUDA else ""))
    csv_path = stem + ".csv"
    _atomic_write_csv(csv_path, rows)
    plot(results, stem + ".png", cfg)
    print(f"wrote {csv_path}")


if __name__ == "__main__":
    main()
