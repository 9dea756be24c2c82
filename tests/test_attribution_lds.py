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

SCRIPT = Path(__file__).resolve().parents[1] / "recipes" / "benchmarks" / "attribution_lds.py"
HF_METHODS = {"kron", "exact", "adam_exact", "adam_rank1", "adam_adafactor", "adam_full"}


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
