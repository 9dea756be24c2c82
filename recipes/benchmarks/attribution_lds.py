"""Question: how well do hf_gradext's projected-gradient attribution scores predict retraining, next to
peers at the same projection dimension, and at what projection time and memory?

Metric: linear datamodeling score (LDS). M random 50% subsets S_m of the training set (fixed seeds); a
model retrained from the same initialization on each subset (same recipe: epochs, batch, AdamW, data
order seed m); the loss L_m(q) of each held-out query q under model m. The attribution scores tau(q, i)
come from ONE model trained on the whole training set. Predicted subset score: sum_{i in S_m} tau(q, i).
A higher score means "training on i lowers q's loss", so LDS(q) = Spearman over m of (predicted, -L_m(q))
(ranks without tie correction: both are continuous). Every projected method is run with 8 projection
seeds (``--proj_seeds``): reported are the mean over queries of the seed-averaged LDS, a 95% percentile
bootstrap interval over queries (10,000 resamples) and the range of the per-seed means (a single
projection draw at D = 128 moves LDS by up to 0.04). Comparisons between methods use the paired
difference to the best peer at the same D and score (``lds_minus_<peer>`` rows): both methods are
evaluated on the same queries, so the difference is much sharper than the two intervals; its 95%
interval resamples the queries (shared) and each method's seeds (independent), 10,000 times.

Methods (representation x score). hf_gradext: ``kron`` (KroneckerProjector on the 8 block weights of a
2-layer GPT-2 with the 0.1 defaults, Gaussian factors and ``split="cost"``; rank_total per layer 16 / 64 /
256 -> D = 128 / 512 / 2048; rank_min = the default 8, lowered to 4 for rank_total 16; the cost rule then
gives 4x4, 8x8 and, at 256, 32x8 / 16x16 / 32x8 / 8x32). The 0.2 defaults (rademacher, balanced) are
``kron_rad`` at D = 128 and 512 (4x4 and 8x8 either way) and ``kron_rad_bal`` at D = 2048. ``kron_square`` (16x16 everywhere, where that differs: the split bergson uses), ``kron_orth``
(``method="row_orthonormal"`` factors), ``kron_rad`` (``method="rademacher"``: +-1 entries, what bergson
draws), ``kron_rad_bal`` (rademacher with ``split="balanced"``, the square-most split, where it differs),
``adam_rank1_rad_bal`` (the rank-1 folded Adam scale on rademacher / balanced factors), ``exact``
(per_sample_gradients of the same weights, D = 98,304, the upper reference). Scores, from
hf_gradext.projection.attribution.top_k_attribution with K = N: ``dot``, ``cosine``, ``damped`` =
g_q^T (F + 0.1 tr(F)/D I)^-1 g_i with F = G^T G / N (for ``exact`` the same formula by Woodbury on the
N x N Gram matrix). Optimizer-aware (LESS-style, hf_gradext.projection.preconditioning): training rows
s * g_i with s = 1 / (sqrt(v_hat) + eps) from the full model's AdamW state (saved as an optimizer.pt with
Trainer's two parameter groups and read back from the file), query rows plain; ``adam_exact`` =
elementwise on exact gradients, then the same Kronecker matrices (naive projection); ``adam_rank1`` /
``adam_adafactor`` = the factored scale folded into the projection factors (the factored path, no
gradient built); ``adam_full`` = elementwise, no projection. The factored scale's error against the
elementwise one is written too (``adam_*/scale_error``, ``adam_*/vs_exact``).

Peers, same model / data / subsets / queries / weights: bergson (InMemoryCollector: per-module
double-sided Rademacher projection p x p, p = 4 / 8 / 16 -> the same D; plain, and with its AdamNormalizer
loaded from the same optimizer.pt, which forms the full gradient before projecting; its rows are scored by
the same dot / cosine / damped code, so the representations are compared), dattri (TRAKAttributor) and
traker (TRAKer with its CPU BasicProjector): dense Gaussian projection of torch.func per-sample gradients
of the same weights to D and their own TRAK score (1 - p weighting, model output = logit of
p = exp(-mean token loss)), with their default regularization 0: for D >= N their Phi^T Phi is singular.

Cost per method and score: ``cpu_seconds`` (process CPU time; the table's column) and ``seconds`` (wall)
to compute the training and query rows and that score, best of 3 runs with 1 torch thread (CPU time is
the steadier one on a shared machine; compare within a run); ``peak_rss_delta`` = peak
resident memory during that work minus the resident memory before it (Linux VmHWM, reset through
/proc/self/clear_refs after a malloc_trim; only without /proc: the ru_maxrss delta, which can only grow).

Run (CPU, about 30 minutes on 1 thread of a shared 2-core machine; peers that are not installed are
skipped; docs/projection.md gives the versions used and how to install them next to a CPU torch):
    python recipes/benchmarks/attribution_lds.py
Smoke (under a minute, what the test runs):
    python recipes/benchmarks/attribution_lds.py --smoke --out /tmp/lds.csv
Redraw the PNGs from a CSV:  python recipes/benchmarks/attribution_lds.py --plot_only [--out CSV]
Writes attribution_lds.csv (long format: one row per method x metric), attribution_lds.png (LDS against D)
and attribution_lds_paired.png (each hf_gradext method minus the best peer) next to this script (``--out``
moves them: the PNGs take the CSV's name).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import functools
import gc
import importlib.metadata
import json
import logging
import math
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common
from lds_peers import bergson_methods, dattri_methods, peer_versions, traker_methods
from lds_report import (
    KINDS,
    TRAK_METHODS,
    UNSEEDED,
    bootstrap,
    lds,
    plot,
    versus_best_peer,
)

os.environ.setdefault("TQDM_DISABLE", "1")  # the peers' progress bars
import torch  # noqa: E402

from hf_gradext.data import build_embedded_tokenizer, embedded_documents
from hf_gradext.grad import per_sample_gradients
from hf_gradext.projection import KroneckerProjector
from hf_gradext.projection.attribution import top_k_attribution
from hf_gradext.projection.preconditioning import AdamPreconditioner

DAMPING = 0.1  # relative to the mean eigenvalue of F (attribution.py's convention)


# ---------------------------------------------------------------------- data, model, training
def build_data(n_train: int, n_query: int, seq: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """First ``seq`` tokens of embedded-corpus documents: queries from the held-out head, train after it."""
    tok = build_embedded_tokenizer(512)
    docs = embedded_documents()
    held_out = len(docs) * 5 // 100  # hf_gradext's default validation split of the embedded corpus
    ids = [tok(d)["input_ids"][:seq] for d in docs]
    query = [x for x in ids[:held_out] if len(x) == seq][:n_query]
    train = [x for x in ids[held_out:] if len(x) == seq][:n_train]
    return torch.tensor(train), torch.tensor(query), len(tok)


def make_model(vocab: int, seq: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab, n_positions=seq, n_embd=64, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    config._attn_implementation = "eager"  # vmap-friendly (dattri); same numbers as sdpa
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


def make_optimizer(model, lr: float) -> torch.optim.AdamW:
    """AdamW with HF Trainer's two groups (decay, no decay), so its state_dict is what optimizer.pt holds."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": 0.01},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def batch_of(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def train(init: dict, model, ids: torch.Tensor, epochs: int, batch: int, seed: int, lr: float):
    """Train ``model`` (reset to ``init``) on ``ids``; the data order depends on ``seed`` only."""
    model.load_state_dict(init)
    model.train()
    opt = make_optimizer(model, lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for chunk in torch.randperm(len(ids), generator=gen).split(batch):
            loss = model(input_ids=ids[chunk], labels=ids[chunk]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return opt


@torch.no_grad()
def per_example_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]  # (Q, T-1, V)
    tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return tok.mean(dim=1)  # (Q,)


# ---------------------------------------------------------------------- scores
def blocks_of(rows: torch.Tensor, size: int = 64) -> Callable:
    def gen():
        for s in range(0, rows.shape[0], size):
            yield rows[s : s + size], [{"example_id": i} for i in range(s, min(s + size, rows.shape[0]))]

    return gen


def _scored(fn: Callable, seed: int, kind: str) -> torch.Tensor:
    return score_matrix(*fn(seed), kind)


def score_matrix(train_rows: torch.Tensor, query_rows: torch.Tensor, kind: str) -> torch.Tensor:
    """(Q, N) scores from hf_gradext's attribution (top-K with K = N, put back in training order)."""
    base = "dot" if kind == "damped" else kind
    damping = DAMPING if kind == "damped" else None
    n = train_rows.shape[0]
    if kind == "damped" and train_rows.shape[1] > 4096:
        return damped_by_gram(train_rows, query_rows)
    scores, index = top_k_attribution(blocks_of(train_rows), query_rows, n, kind=base, damping=damping)
    out = torch.empty_like(scores)
    ids = torch.tensor([[m["example_id"] for m in row] for row in index])
    return out.scatter_(1, ids, scores)


def damped_by_gram(g: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``q^T (G^T G / N + lam I)^-1 g_i`` with ``lam = DAMPING tr(F) / D`` via Woodbury (D >> N)."""
    g, q = g.to(torch.float64), q.to(torch.float64)
    n, d = g.shape
    k = g @ g.T  # (N, N)
    lam = DAMPING * float(k.diagonal().sum()) / n / d
    kq = q @ g.T  # (Q, N)
    return (kq - kq @ torch.linalg.solve(n * lam * torch.eye(n, dtype=k.dtype) + k, k)) / lam


# ---------------------------------------------------------------------- cost measurement
def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measured(fn: Callable[[], Any], runs: int = 3) -> tuple[Any, float, float, float, str]:
    """``(result, best wall s, best CPU s, peak RSS delta MiB, how)`` of ``fn`` (see the module doc)."""
    best, best_cpu, peak, how = math.inf, math.inf, 0.0, "VmHWM"
    result = None
    for _ in range(runs):
        result = None  # free the previous run's result before measuring the next
        gc.collect()
        _malloc_trim()  # hand freed heap back to the OS, so a reused free list does not hide a peak
        base = _common.proc_status_kib("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        except OSError:
            base, how = None, "ru_maxrss"
        start_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
        if base is not None and (hwm := _common.proc_status_kib("VmHWM")) is not None:
            peak = max(peak, (hwm - base) / 1024)
        else:
            peak = max(peak, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_max) / 1024)
    return result, best, best_cpu, peak, how


# ---------------------------------------------------------------------- hf_gradext representations
def kron_rows(proj: KroneckerProjector, ids: torch.Tensor, batch: int = 32) -> torch.Tensor:
    return torch.cat([proj.project(batch_of(c)) for c in ids.split(batch)]).double()


def exact_grads(model, ids: torch.Tensor, names: list[str], layers: str, batch: int = 32):
    """Yield ``{weight name: (B, *shape)}`` exact per-sample gradients, batch by batch."""
    for c in ids.split(batch):
        grads = per_sample_gradients(model, batch_of(c), layers=layers, dtype=torch.float64)
        yield {n: grads[n] for n in names}


def flat(grads: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([grads[n].flatten(1) for n in names], dim=1)


def hf_methods(model, train_ids, query_ids, ranks, precond: AdamPreconditioner) -> tuple[dict, list[str]]:
    """``{(method, dim): fn(seed) -> (train rows, query rows)}`` for every hf_gradext representation."""
    methods: dict[tuple[str, int], Callable] = {}
    probe = KroneckerProjector(model, layers="mlp,attn", rank_total=ranks[0], rank_min=1, seed=0)
    names, layers = [b.weight_name for b in probe.blocks], probe.capture_layers()

    def projector(
        rank: int, seed: int, square: bool = False, method: str = "gaussian", split: str = "cost"
    ) -> KroneckerProjector:
        # The package default rank_min (8), lowered where rank_total < 64 so that D is the one asked for;
        # square: k_i = k_o = sqrt(rank_total) (bergson's p x p) forced through rank_min.
        rank_min = math.isqrt(rank) if square else min(8, math.isqrt(rank))
        return KroneckerProjector(
            model,
            layers="mlp,attn",
            rank_total=rank,
            rank_min=rank_min,
            seed=seed,
            method=method,
            split=split,
        )

    def kron(seed, rank, square=False, method="gaussian", split="cost"):
        proj = projector(rank, seed, square, method, split)
        return kron_rows(proj, train_ids), kron_rows(proj, query_ids)

    def adam_factored(seed, rank, mode, method="gaussian", split="cost"):
        proj = projector(rank, seed, method=method, split=split)
        return kron_rows(precond.fold_into(proj, mode), train_ids), kron_rows(proj, query_ids)

    def adam_exact(seed, rank):
        proj = projector(rank, seed)
        rows = [proj.naive_project(precond.apply(g)) for g in exact_grads(model, train_ids, names, layers)]
        return torch.cat(rows).double(), kron_rows(proj, query_ids)

    def layout(rank: int, **kw) -> list[tuple[int, int]]:
        return [(b.k_i, b.k_o) for b in projector(rank, 0, **kw).blocks]

    for rank in ranks:
        d, splits = projector(rank, 0).dim, layout(rank)
        methods[("kron", d)] = functools.partial(kron, rank=rank)
        methods[("kron_orth", d)] = functools.partial(kron, rank=rank, method="row_orthonormal")
        methods[("kron_rad", d)] = functools.partial(kron, rank=rank, method="rademacher")
        if layout(rank, split="balanced") != splits:
            methods[("kron_square", d)] = functools.partial(kron, rank=rank, square=True)
            methods[("kron_rad_bal", d)] = functools.partial(
                kron, rank=rank, method="rademacher", split="balanced"
            )
        methods[("adam_rank1", d)] = functools.partial(adam_factored, rank=rank, mode="rank1")
        methods[("adam_rank1_rad_bal", d)] = functools.partial(
            adam_factored, rank=rank, mode="rank1", method="rademacher", split="balanced"
        )
        methods[("adam_adafactor", d)] = functools.partial(adam_factored, rank=rank, mode="adafactor")
        methods[("adam_exact", d)] = functools.partial(adam_exact, rank=rank)
    full_dim = sum(p.numel() for n, p in model.named_parameters() if n in names)

    def exact(seed):
        train = torch.cat([flat(g, names) for g in exact_grads(model, train_ids, names, layers)])
        return train, torch.cat([flat(g, names) for g in exact_grads(model, query_ids, names, layers)])

    def adam_full(seed):
        train = torch.cat(
            [flat(precond.apply(g), names) for g in exact_grads(model, train_ids, names, layers)]
        )
        return train, torch.cat([flat(g, names) for g in exact_grads(model, query_ids, names, layers)])

    methods[("exact", full_dim)], methods[("adam_full", full_dim)] = exact, adam_full
    return methods, names


def factored_error(model, train_ids, rank: int, precond: AdamPreconditioner) -> dict[str, float]:
    """Error of the factored (folded) Adam scale against the exact elementwise one, on the training rows.

    ``full``: ``|outer(u, w) * G - s * G| / |s * G|`` over the concatenated exact gradients (what any
    projection of them estimates); ``D``: the same for the projected rows (folded factors vs exact
    gradients scaled then projected with the same matrices), and their mean row cosine.
    """
    proj = KroneckerProjector(
        model, layers="mlp,attn", rank_total=rank, rank_min=min(8, math.isqrt(rank)), seed=0
    )
    names, layers = [b.weight_name for b in proj.blocks], proj.capture_layers()
    out: dict[str, float] = {}
    grads = list(exact_grads(model, train_ids, names, layers))
    exact_rows = torch.cat([proj.naive_project(precond.apply(g)) for g in grads]).double()
    for mode in ("rank1", "adafactor"):
        num = den = 0.0
        for g in grads:
            scaled = precond.apply(g)
            for n in names:
                approx = g[n] * torch.outer(*precond.factored(n, mode))
                num += float((approx - scaled[n]).pow(2).sum())
                den += float(scaled[n].pow(2).sum())
        rows = kron_rows(precond.fold_into(proj, mode), train_ids)
        out[f"{mode}/full_rel_error"] = math.sqrt(num / den)
        out[f"{mode}/D={proj.dim}_rel_error"] = float((rows - exact_rows).norm() / exact_rows.norm())
        out[f"{mode}/D={proj.dim}_row_cosine"] = float(
            torch.nn.functional.cosine_similarity(rows, exact_rows, dim=1).mean()
        )
    return out


# ---------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds): what the test runs")
    p.add_argument("--subsets", type=int, default=64, help="M, retrained models")
    p.add_argument("--train", type=int, default=256, help="N training examples")
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--seq", type=int, default=48)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--ranks", default="16,64,256", help="rank_total per layer (bergson p = sqrt)")
    p.add_argument(
        "--peers", default="bergson,dattri,traker", help="comma list; missing packages are skipped"
    )
    p.add_argument("--proj_seeds", type=int, default=8, help="projection seeds averaged per method")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot_only", action="store_true", help="redraw the PNG from an existing --out CSV")
    p.add_argument("--out", default=str(Path(__file__).with_suffix(".csv")))
    args = p.parse_args()
    if args.smoke:
        args.subsets, args.train, args.queries, args.epochs, args.ranks, args.proj_seeds = (
            4,
            32,
            4,
            1,
            "16",
            1,
        )
    return args


def main() -> None:
    args = parse_args()
    if args.plot_only:
        print(f"wrote {plot(Path(args.out))}")
        return
    logging.disable(logging.INFO)  # the peers' per-call INFO lines
    torch.set_num_threads(args.threads)
    ranks = [int(r) for r in args.ranks.split(",")]
    train_ids, query_ids, vocab = build_data(args.train, args.queries, args.seq)
    model = make_model(vocab, args.seq)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    n = len(train_ids)

    # Retraining on M random halves (fixed seeds), then the full model the scores come from.
    gen = torch.Generator().manual_seed(1234)
    masks = torch.zeros(args.subsets, n, dtype=torch.bool)
    losses = torch.empty(args.subsets, len(query_ids))
    start = time.perf_counter()
    for m in range(args.subsets):
        masks[m, torch.randperm(n, generator=gen)[: n // 2]] = True
        train(init, model, train_ids[masks[m]], args.epochs, 16, seed=m, lr=args.lr)
        losses[m] = per_example_loss(model, query_ids)
        if (m + 1) % 8 == 0:
            print(f"retrained {m + 1}/{args.subsets} ({time.perf_counter() - start:.0f} s)", flush=True)
    retrain_s = time.perf_counter() - start
    opt = train(init, model, train_ids, args.epochs, 16, seed=10_000, lr=args.lr)
    full_query_loss = float(per_example_loss(model, query_ids).mean())
    for p in model.parameters():
        p.grad = None

    tmp = tempfile.mkdtemp(prefix="lds-")
    atexit.register(shutil.rmtree, tmp, True)  # optimizer.pt and the peers' stores
    optimizer_pt = os.path.join(tmp, "optimizer.pt")
    torch.save(opt.state_dict(), optimizer_pt)  # what Trainer writes into checkpoint-N/
    precond = AdamPreconditioner.from_checkpoint(optimizer_pt, model)

    methods, names = hf_methods(model, train_ids, query_ids, ranks, precond)
    versions = peer_versions()
    skipped = {}
    for peer in [p for p in args.peers.split(",") if p]:
        try:
            if peer == "bergson":
                methods.update(
                    bergson_methods(
                        model, train_ids, query_ids, [math.isqrt(r) for r in ranks], optimizer_pt, tmp
                    )
                )
            elif peer == "dattri":
                methods.update(
                    dattri_methods(model, train_ids, query_ids, [r * len(names) for r in ranks], names)
                )
            elif peer == "traker":
                methods.update(
                    traker_methods(model, train_ids, query_ids, [r * len(names) for r in ranks], names, tmp)
                )
            else:
                skipped[peer] = "no adapter in this script"
        except ImportError as exc:
            skipped[peer] = f"not importable: {exc}"

    meta = _common.run_metadata("cpu")
    config = json.dumps(
        {
            "N": n, "Q": len(query_ids), "M": args.subsets, "seq": args.seq, "epochs": args.epochs,
            "lr": args.lr, "damping": DAMPING, "threads": args.threads, "smoke": args.smoke,
            "proj_seeds": args.proj_seeds,
            "peers": versions, "skipped": skipped, "retrain_seconds": round(retrain_s, 1),
            "full_model_query_loss": round(full_query_loss, 4),
            "subset_query_loss": round(float(losses.mean()), 4),
            "hf_gradext": importlib.metadata.version("hf_gradext"),
        }
    )  # fmt: skip
    common = {"benchmark": "attribution_lds", **meta, "config": config}
    rows, table = [], []
    per_seed_lds: dict[tuple[str, str, int], torch.Tensor] = {}  # (S, Q) per method, score and D
    for (method, dim), fn in methods.items():
        seeds = [0] if method in UNSEEDED else list(range(args.proj_seeds))
        for kind in ("trak",) if method in TRAK_METHODS else KINDS:
            per_seed = []  # (Q,) LDS per projection seed
            for seed in seeds:
                # Timed (seed 0): the training and query rows, then this score (TRAK: its own pipeline).
                job = (
                    functools.partial(fn, seed)
                    if kind == "trak"
                    else functools.partial(_scored, fn, seed, kind)
                )
                try:
                    if seed == 0:
                        scores, seconds, cpu, peak, how = measured(job)
                    else:
                        scores = job()
                except Exception as exc:  # a peer failing on this model is a result to report, not a crash
                    skipped[f"{method}@{dim}"] = f"{type(exc).__name__}: {exc}"[:300]
                    print(f"{method} D={dim}: failed: {skipped[f'{method}@{dim}']}")
                    break
                per_seed.append(lds(scores, masks, losses))
            if len(per_seed) != len(seeds):
                break
            stack = torch.stack(per_seed)  # (S, Q)
            per_seed_lds[(method, kind, dim)] = stack
            per_query = stack.mean(dim=0)  # the seed-averaged LDS of each query
            lo, hi = bootstrap(per_query)
            variant = f"{method}/{kind}/D={dim}"
            mean, seed_means = float(per_query.mean()), stack.mean(dim=1)
            smin, smax = float(seed_means.min()), float(seed_means.max())
            print(
                f"{variant}: LDS {mean:.3f} (seeds {smin:.3f}..{smax:.3f}), {seconds:.2f} s, {peak:.0f} MiB",
                flush=True,
            )
            rows += [
                _common.row(common, variant, "lds_mean", f"{mean:.4f}", "spearman"),
                _common.row(common, variant, "lds_ci95_low", f"{lo:.4f}", "spearman"),
                _common.row(common, variant, "lds_ci95_high", f"{hi:.4f}", "spearman"),
                _common.row(common, variant, "lds_seed_min", f"{smin:.4f}", "spearman"),
                _common.row(common, variant, "lds_seed_max", f"{smax:.4f}", "spearman"),
                _common.row(common, variant, "projection_seeds", len(seeds), "1"),
                _common.row(common, variant, "seconds", f"{seconds:.3f}", "s"),
                _common.row(common, variant, "cpu_seconds", f"{cpu:.3f}", "s"),
                _common.row(common, variant, "peak_rss_delta", f"{peak:.1f}", f"MiB ({how})"),
            ]
            table.append((method, kind, dim, mean, lo, hi, smin, smax, cpu, peak))
    paired = versus_best_peer(per_seed_lds)
    for (method, kind, dim), (peer, diff, lo, hi) in paired.items():
        variant = f"{method}/{kind}/D={dim}"
        rows += [
            _common.row(common, variant, f"lds_minus_{peer}", f"{diff:.4f}", "spearman"),
            _common.row(common, variant, f"lds_minus_{peer}_ci95_low", f"{lo:.4f}", "spearman"),
            _common.row(common, variant, f"lds_minus_{peer}_ci95_high", f"{hi:.4f}", "spearman"),
        ]
    for mode in ("rank1", "adafactor"):
        for name, err in precond.factor_error(mode).items():
            variant = f"adam_{mode}/scale_error/{name}"
            rows.append(_common.row(common, variant, "rel_frobenius", f"{err:.4f}", "1"))
    for key, value in factored_error(model, train_ids, ranks[-1], precond).items():
        mode, metric = key.split("/")
        rows.append(_common.row(common, f"adam_{mode}/vs_exact", metric, f"{value:.4f}", "1"))
        print(f"adam_{mode} vs exact elementwise scaling: {metric} = {value:.4f}")
    if skipped:
        common["config"] = json.dumps({**json.loads(config), "skipped": skipped})
        rows = [{**r, "config": common["config"]} for r in rows]
    out = _common.write_csv(args.out, rows)
    print(f"{'method':<15}{'score':<8}{'D':>7}{'LDS':>8}  {'95% CI':<17}{'seeds':<15}{'cpu s':>7}{'MiB':>7}")
    for method, kind, dim, mean, lo, hi, smin, smax, cpu, peak in table:
        print(
            f"{method:<15}{kind:<8}{dim:>7}{mean:>8.3f}  [{lo:6.3f}, {hi:6.3f}] {smin:6.3f}..{smax:6.3f}"
            f"{cpu:>7.2f}{peak:>7.0f}"
        )
    if paired:
        print("paired difference to the best peer at the same D and score (same queries; 95% CI):")
    for (method, kind, dim), (peer, diff, lo, hi) in paired.items():
        print(f"  {method:<20}{kind:<8}{dim:>6}  - {peer:<13}{diff:+.4f} [{lo:+.4f}, {hi:+.4f}]")
    print(f"skipped: {skipped}" if skipped else "", f"wrote {out}")
    plot(out)


if __name__ == "__main__":
    main()
