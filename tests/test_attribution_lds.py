"""recipes/benchmarks/attribution_lds.py runs end to end at smoke sizes and writes its CSV and PNG.

The LDS values at these sizes (4 subsets, 4 queries) are noise and are not checked; what is checked is
that the script still works against the current projection API (and the peers' APIs, when installed).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "recipes" / "benchmarks" / "attribution_lds.py"
HF_METHODS = {
    "kron", "kron_orth", "kron_rad", "exact", "adam_exact", "adam_rank1", "adam_rank1_rad_bal",
    "adam_adafactor", "adam_full",
}  # fmt: skip


def _run(tmp_path, peers: str) -> list[dict[str, str]]:
    out = tmp_path / "lds.csv"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--peers", peers, "--out", str(out)],
        cwd=str(tmp_path),  # nothing may be written next to the committed CSV
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.with_suffix(".png").exists()
    rows = list(csv.DictReader(out.open()))
    for column in ("device", "torch", "transformers", "date", "config"):
        assert all(r[column] for r in rows), column
    assert "peers" in json.loads(rows[0]["config"])  # peer versions are recorded with every result
    return rows


def _methods(rows):
    return {r["variant"].split("/")[0] for r in rows if r["metric"] == "lds_mean"}


@pytest.mark.slow
def test_lds_benchmark_smoke_hf_gradext_methods(tmp_path):
    rows = _run(tmp_path, peers="")
    assert _methods(rows) >= HF_METHODS
    kinds = {r["variant"].split("/")[1] for r in rows if r["variant"].startswith("kron/")}
    assert kinds == {"dot", "cosine", "damped"}
    for r in rows:
        if r["metric"] == "lds_mean":
            assert -1.0 <= float(r["value"]) <= 1.0
    assert any(r["variant"].startswith("adam_rank1/scale_error/") for r in rows)
    assert {r["metric"] for r in rows if r["variant"] == "adam_rank1/vs_exact"} >= {"full_rel_error"}


@pytest.mark.slow
def test_lds_benchmark_smoke_with_peers(tmp_path):
    pytest.importorskip("bergson")
    pytest.importorskip("dattri")
    pytest.importorskip("trak")
    rows = _run(tmp_path, peers="bergson,dattri,traker")
    assert _methods(rows) >= {"bergson", "bergson_adam", "dattri_trak", "traker"}
    # every hf_gradext method is paired with a peer's scores on the same queries
    paired = {r["variant"].split("/")[0] for r in rows if r["metric"].startswith("lds_minus_bergson")}
    assert paired >= {"kron", "kron_rad", "adam_rank1"}


def _benchmark_module(name: str = "lds_report"):
    """A module of the benchmark (the statistics live in lds_report.py, next to the script)."""
    return load_script(SCRIPT.with_name(f"{name}.py"))


def test_paired_difference_is_sharper_than_the_unpaired_intervals():
    import torch

    bench = _benchmark_module()
    gen = torch.Generator().manual_seed(0)
    query_level = torch.rand(1, 40, generator=gen, dtype=torch.float64)  # (1, Q): shared by both methods
    b = query_level + 0.01 * torch.randn(6, 40, generator=gen, dtype=torch.float64)  # (S, Q)
    a = query_level + 0.03 + 0.01 * torch.randn(6, 40, generator=gen, dtype=torch.float64)
    point, lo, hi = bench.paired_difference(a, b)
    assert point == pytest.approx(float(a.mean() - b.mean()))
    assert lo < 0.03 < hi and lo > 0  # the shift is found, and it is significant
    a_lo, a_hi = bench.bootstrap(a.mean(0))
    assert hi - lo < 0.2 * (a_hi - a_lo)  # the query-to-query spread cancels in the difference


def test_versus_best_peer_picks_the_better_peer_per_d_and_score():
    import torch

    bench = _benchmark_module()
    ones = torch.ones(2, 5, dtype=torch.float64)
    lds = {
        ("kron", "dot", 128): 0.5 * ones,
        ("bergson", "dot", 128): 0.4 * ones,
        ("bergson_adam", "dot", 128): 0.45 * ones,
        ("exact", "dot", 999): ones,  # no projection: not paired
        ("kron", "cosine", 512): ones,  # no peer at this D and score: not paired
    }
    paired = bench.versus_best_peer(lds)
    assert set(paired) == {("kron", "dot", 128)}
    peer, diff, lo, hi = paired[("kron", "dot", 128)]
    assert peer == "bergson_adam" and diff == pytest.approx(0.05) and lo == pytest.approx(0.05)
