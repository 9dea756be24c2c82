"""Question: can any window policy reach the Pareto goal (GA1's eval loss within 1% at half its optimizer
steps, equal data) at this budget, given the gradient noise scale the runs actually have?

Runs ``gns_sample`` (the Pareto setup of ``gqc_pareto.py``: same data, model, LR schedule) and records the
noise scale ``B_simple = tr(Sigma) / |G|^2`` of every stepped window (in samples of ``T`` tokens), by the
fraction of the data consumed when the window closed. Then, with McCandlish et al.'s (2018) step/data
trade-off, ``S = S_min (1 + B_noise / B)`` and ``E = E_min (1 + B / B_noise)``, taking ``B_noise ~ B_simple``
per phase of the data, it computes the best any schedule can do against fixed accumulation 1 (``B`` = one
microbatch): the batch multiple ``m_i`` per phase that halves the optimizer steps while keeping the most
*effective* data, ``sum_i f_i (1 + B / Bn_i) / (1 + m_i B / Bn_i)`` (1.0 = as data-efficient as GA1; a
Lagrange condition solved by bisection, :func:`best_allocation`). A run at equal raw data and a lower
effective fraction trains like GA1 on less data: its loss is higher by what GA1's own curve gains over the
missing fraction. An estimate under that model, not a training run; ``B_simple`` is measured (logged per
window), the model is McCandlish's.

CPU (default; 3 seeds, about 1.5 minutes):
    python recipes/benchmarks/gqc_critical_batch.py
Smoke (tests; numbers meaningless):
    python recipes/benchmarks/gqc_critical_batch.py --smoke --out /tmp/critical.csv
Writes a long-format CSV next to this file (``gqc_critical_batch.csv``; ``--out``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import _common

HERE = Path(__file__).resolve().parent
PHASES = ((0.0, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))  # fractions of the data


def efficiency(m: float, batch: float, b_noise: float) -> float:
    """Data efficiency of batch ``m * batch`` relative to ``batch`` (McCandlish: ``E ~ 1 + B / B_noise``)."""
    return (1 + batch / b_noise) / (1 + m * batch / b_noise)


def best_allocation(
    fractions: list[float], b_noise: list[float], batch: float, step_ratio: float = 0.5
) -> tuple[list[float], float]:
    """Batch multiples ``m_i >= 1`` per phase with ``sum f_i / m_i = step_ratio`` that keep the most data.

    Maximizes ``sum_i f_i efficiency(m_i)``. Stationarity gives ``m_i / (1 + m_i r_i) = c / sqrt((1 + r_i)
    r_i)`` with ``r_i = batch / Bn_i`` and one multiplier ``c``, i.e. ``m_i = c a_i / (1 - c a_i r_i)``,
    clamped at 1; the step total falls as ``c`` grows, so ``c`` is found by bisection.

    Returns:
        (multiples per phase, effective data fraction).
    """
    if not 0 < step_ratio <= 1:
        raise ValueError(f"step_ratio must be in (0, 1], got {step_ratio}")
    r = [batch / b for b in b_noise]
    a = [1 / math.sqrt((1 + ri) * ri) for ri in r]
    c_max = min(1 / (ai * ri) for ai, ri in zip(a, r, strict=True))  # m_i -> inf as c -> c_max

    def multiples(c: float) -> list[float]:
        return [max(1.0, c * ai / (1 - c * ai * ri)) for ai, ri in zip(a, r, strict=True)]

    def steps(c: float) -> float:
        return sum(f / m for f, m in zip(fractions, multiples(c), strict=True))

    lo, hi = 0.0, c_max * (1 - 1e-15)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if steps(mid) > step_ratio else (lo, mid)
    ms = multiples(hi)
    kept = sum(f * efficiency(m, batch, b) for f, m, b in zip(fractions, ms, b_noise, strict=True))
    return ms, kept


def measure(name: str, seed: int, opts: argparse.Namespace) -> list[tuple[float, float]]:
    """(data fraction at the window's close, B_simple in samples) for every stepped window of one run."""
    import gqc_pareto

    from hf_gradext.gqc.controllers import GNSSample

    seen: list[tuple[float, float]] = []
    consumed = [0]
    real_end = GNSSample.end_window

    def end_window(self: GNSSample, stepped: bool) -> None:
        est = self._window_estimate
        consumed[0] += self.window.count
        if stepped and est is not None:
            b = est.trace_sigma / est.signal_sq if est.signal_sq > 0 else math.inf
            seen.append((consumed[0], b))
        real_end(self, stepped)

    s = gqc_pareto._settings(opts)
    data, model, _ = gqc_pareto.build(s, seed, opts.device)
    GNSSample.end_window = end_window  # type: ignore[method-assign]
    try:
        gqc_pareto.run_variant(name, seed, data, model, s, opts)
    finally:
        GNSSample.end_window = real_end  # type: ignore[method-assign]
    total = max(consumed[0], 1)
    return [(n / total, b) for n, b in seen]


def phase_medians(points: list[tuple[float, float]]) -> list[float]:
    """Median finite B_simple of the windows closing in each of :data:`PHASES` (nan if none)."""
    out = []
    for lo, hi in PHASES:
        vals = [b for f, b in points if lo < f <= hi and math.isfinite(b)] or [math.nan]
        out.append(statistics.median(vals))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="gns_sample_tol2_sqrt", help="a gns_sample variant of gqc_pareto.py")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--smoke", action="store_true", help="toy sizes, seed 0 (tests)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "gqc_critical_batch.csv"))
    opts = p.parse_args(argv)
    if not opts.variant.startswith("gns_sample_tol"):
        p.error(f"--variant {opts.variant!r}: the noise scale is measured by gns_sample variants only")
    opts.device = "cpu"
    os.environ.setdefault("QUALITY_THREADS", str(opts.threads))
    import torch

    torch.set_num_threads(opts.threads)
    seeds = [0] if opts.smoke else [int(x) for x in opts.seeds.split(",")]
    batch = 2 if opts.smoke else 8  # samples per microbatch (gqc_pareto's settings)
    fractions = [hi - lo for lo, hi in PHASES]
    common = {"benchmark": "gqc_critical_batch", **_common.run_metadata("cpu")}
    config = f"gqc_pareto setup ({'smoke' if opts.smoke else 'cpu tiny'}), {opts.variant}, B={batch} samples"
    rows: list[dict[str, Any]] = []
    per_phase: list[list[float]] = [[] for _ in PHASES]
    for seed in seeds:
        medians = phase_medians(measure(opts.variant, seed, opts))
        for i, ((lo, hi), b) in enumerate(zip(PHASES, medians, strict=True)):
            per_phase[i].append(b)
            rows.append(_common.row({**common, "config": config}, f"seed{seed}", f"b_simple@{lo:g}-{hi:g}",
                                    round(b, 3), "samples"))  # fmt: skip
        print(f"seed {seed}: B_simple per phase " + ", ".join(f"{b:.1f}" for b in medians), flush=True)
    b_noise = [statistics.median(v) for v in per_phase]
    usable = all(math.isfinite(b) and b > 0 for b in b_noise)
    for (lo, hi), b in zip(PHASES, b_noise, strict=True):
        rows.append(
            _common.row(
                {**common, "config": config}, "all", f"b_simple@{lo:g}-{hi:g}", round(b, 3), "samples"
            )
        )
    if usable:
        ms, kept = best_allocation(fractions, b_noise, batch)
        uniform = sum(f * efficiency(2.0, batch, b) for f, b in zip(fractions, b_noise, strict=True))
        for (lo, hi), m in zip(PHASES, ms, strict=True):
            rows.append(
                _common.row(
                    {**common, "config": config},
                    "best_half_steps",
                    f"batch_multiple@{lo:g}-{hi:g}",
                    round(m, 3),
                    "x",
                )
            )
        rows.append(
            _common.row(
                {**common, "config": config}, "best_half_steps", "effective_data", round(kept, 4), "fraction"
            )
        )
        rows.append(
            _common.row(
                {**common, "config": config}, "uniform_x2", "effective_data", round(uniform, 4), "fraction"
            )
        )
        print("best schedule at half the steps: batch x " + ", ".join(f"{m:.2f}" for m in ms)
              + f" per phase, effective data {kept:.1%} of GA1's (uniform x2: {uniform:.1%})")  # fmt: skip
    else:
        print("some phase has no finite noise scale; no allocation computed", file=sys.stderr)
    path = _common.write_csv(opts.out, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
