"""Every benchmark script runs end to end at toy sizes and writes its CSV.

The timings are meaningless at these sizes and are not checked (speed targets live in the
benchmarks, never in tests); what is checked is that each script still works against the current
API, so a session with a lent GPU spends its device time measuring, not debugging.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import load_script

BENCH_DIR = Path(__file__).resolve().parents[1] / "recipes" / "benchmarks"
TOY = ["--batch", "2", "--seq", "16"]
CASES = {  # script -> (extra flags, environment, variants the CSV must hold)
    "bench_per_sample_grads.py": (
        [*TOY, "--reps", "1", "--warmup", "1"],
        {},
        {"plain", "engine_blocks", "engine_all_sparse", "engine_norms", "torch_func_vmap", "opacus", "loop"},
    ),
    "bench_collection.py": (
        [*TOY, "--steps", "1", "--warmup", "1", "--rounds", "1", "--dd-mib", "4"],
        {},
        {"disk", "none", "stats", "norms_disk", "full_disk", "loop_stats"},
    ),
    "bench_projection.py": (
        [*TOY, "--rounds", "1", "--reps", "1", "--warmup", "1", "--rank", "64"],
        {},
        {"plain_fwd_bwd", "plain_train_step", "train_step_proj", "dataset_pass_proj", "materialize_dense"},
    ),
    "bench_gpt2_patches.py": (
        [*TOY, "--reps", "1", "--steps", "1", "--warmup", "1", "--mask_calls", "5"],
        {},
        {"stock", "mask_cache", "rms_norm", "swiglu", "all", "sdpa/none/mask_cache"},
    ),
    "bench_gqc_overhead.py": ([], {"BENCH_REPEATS": "1"}, {"stock", "gqc_sbc", "gqc_gnts"}),
    "bench_cli_startup.py": (["--reps", "1"], {}, {"help", "version", "train_help"}),
    "gqc_pareto.py": (
        ["--smoke"],
        {},
        {"ga1_lr1/all", "sbc_to4_sqrt/all", "gns_sample_tol4_sqrt/all", "seesaw_k1_cap4/all"},
    ),
    "gqc_critical_batch.py": (["--smoke"], {}, {"seed0", "all"}),
    "gqc_quality.py": (
        [],
        {
            "QUALITY_EPOCHS": "1",
            "QUALITY_TRAIN_BLOCKS": "128",
            "QUALITY_EVAL_BLOCKS": "8",
            "QUALITY_VARIANTS": "fixed_ga1,gnts_rel0.8,sbc_8to64",
        },
        {"fixed_ga1", "gnts_rel0.8", "sbc_8to64"},
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_script_runs_and_writes_its_csv(script, tmp_path):
    flags, env, variants = CASES[script]
    out = tmp_path / "result.csv"
    if script == "gqc_quality.py":
        env = {**env, "QUALITY_OUT": str(tmp_path / "result")}
    else:
        flags = [*flags, "--out", str(out)]
    if script == "bench_collection.py":
        flags = [*flags, "--workdir", str(tmp_path / "work")]
    proc = subprocess.run(
        [sys.executable, str(BENCH_DIR / script), *flags],
        cwd=str(tmp_path),  # nothing may be written next to the committed CSVs
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert variants <= {r["variant"] for r in rows}, sorted({r["variant"] for r in rows})
    for column in ("device", "torch", "transformers", "date"):
        assert all(r[column] for r in rows), column  # every result says where and when it was measured


@pytest.mark.slow
def test_gpu_run_script_plumbing_in_toy_mode(tmp_path):
    """``gpu_run.sh`` (what a session with a lent GPU runs): parts, output names, the log of exit codes."""
    script = BENCH_DIR / "gpu_run.sh"
    # PYTHON: this interpreter, so the script needs no python3 with torch on PATH (an unactivated venv).
    env = {
        **os.environ,
        "TOY": "1",
        "OUT": str(tmp_path),
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHON": sys.executable,
    }
    bad = subprocess.run(
        ["bash", str(script), "nonsense"], env=env, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "unknown part" in bad.stderr
    proc = subprocess.run(
        ["bash", str(script), "quality"], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (tmp_path / "quality.log").read_text()
    assert "torch" in log and "=== gqc_quality exit 0" in log
    assert (tmp_path / "gqc_quality_toy.csv").stat().st_size > 0 and (
        tmp_path / "gqc_quality_toy.png"
    ).exists()


def test_shell_scripts_take_the_interpreter_from_python_env():
    """No bare ``python``/``python3`` in the device scripts: ``$PYTHON`` (default python3) everywhere."""
    for name in ("gpu_run.sh", "gpu_wheels.sh"):
        code = [
            line for line in (BENCH_DIR / name).read_text().splitlines() if not line.lstrip().startswith("#")
        ]
        bare = [
            line
            for line in code
            if "python" in line.replace("${PYTHON:-python3}", "").replace("--python-version", "")
        ]
        assert not bare, (name, bare)


def test_norm_share_matches_a_hand_count():
    module = load_script(BENCH_DIR / "gqc_norm_flops.py")
    # T=2, d=1, one layer, vocab 1, ff 1: Linears (1,3) (1,1) (1,1) (1,1) and the head (1,1).
    # training: 3*2*(3+1+1+1) + 3*2*2*2*1 (attention) + 3*2*1 = 36 + 24 + 6 = 66
    # norms: min(4*4, 2*3) + 3*min(4*2, 2*1) + min(4*2, 2*1) = 6 + 6 + 2 = 14
    assert module.norm_share(2, 1, 1, 1, ff_mult=1) == pytest.approx(14 / 66)
    # LayerNorms: 2*1 + 1 = 3 of them, each 5*T*d + 2*d = 10 + 2 = 12
    assert module.layer_norm_share(2, 1, 1, 1, ff_mult=1) == pytest.approx(36 / 66)


def test_write_csv_append_keeps_the_existing_bytes(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    common = load_script(BENCH_DIR / "_common.py")
    row = dict.fromkeys(common.CSV_FIELDS, "x")
    path = tmp_path / "rows.csv"
    # rows of earlier runs, with the csv module's CRLF and one LF line (files edited by hand mix them)
    earlier = ",".join(common.CSV_FIELDS).encode() + b"\r\n" + b"a,b,c,1,u,d,t,tr,day,cfg\n"
    path.write_bytes(earlier)
    common.write_csv(path, [row], append=True)
    data = path.read_bytes()
    assert data.startswith(earlier)
    assert list(csv.DictReader(data[len(earlier) :].decode().splitlines(), fieldnames=common.CSV_FIELDS)) == [
        row
    ]
    common.write_csv(path, [row])  # without append: header + the rows only
    assert list(csv.DictReader(path.read_text().splitlines())) == [row]


def test_best_allocation_matches_a_brute_force_search(monkeypatch):
    import itertools

    monkeypatch.syspath_prepend(str(BENCH_DIR))
    module = load_script(BENCH_DIR / "gqc_critical_batch.py")
    fractions, b_noise, batch = [0.3, 0.3, 0.4], [2.0, 15.0, 60.0], 8.0
    ms, kept = module.best_allocation(fractions, b_noise, batch, step_ratio=0.5)
    assert sum(f / m for f, m in zip(fractions, ms)) == pytest.approx(0.5, rel=1e-9)
    assert kept == pytest.approx(
        sum(f * module.efficiency(m, batch, b) for f, m, b in zip(fractions, ms, b_noise))
    )
    # brute force: m_1, m_2 on a grid, m_3 from the step budget; nothing on the grid keeps more data
    grid = [1 + 0.01 * i for i in range(0, 600)]
    best = 0.0
    for m1, m2 in itertools.product(grid[::4], grid[::4]):
        rest = 0.5 - fractions[0] / m1 - fractions[1] / m2
        if rest <= 0 or fractions[2] / rest < 1:
            continue
        m3 = fractions[2] / rest
        value = sum(f * module.efficiency(m, batch, b) for f, m, b in zip(fractions, (m1, m2, m3), b_noise))
        best = max(best, value)
    assert best <= kept + 1e-9 and kept - best < 2e-3
    assert module.efficiency(1.0, batch, 10.0) == 1.0 and module.efficiency(2.0, batch, 8.0) == pytest.approx(
        2 / 3
    )
    with pytest.raises(ValueError, match="step_ratio"):
        module.best_allocation(fractions, b_noise, batch, step_ratio=0.0)
