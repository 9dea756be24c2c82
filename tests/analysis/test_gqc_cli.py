"""``hf-gradext analyze gqc``: summary numbers and PNGs from a synthetic trainer_state.json."""

from __future__ import annotations

import json

from hf_gradext.analysis.gqc_cli import main, summarize

HISTORY = [
    {
        "loss": 4.0,
        "gqc/microbatches": 1.0,
        "gqc/grad_norm": 0.9,
        "gqc/threshold": 1.0,
        "gqc/tokens": 64.0,
        "gqc/microbatches_total": 1,
        "gqc/capped_steps": 0,
        "gqc/skipped_windows": 0,
        "step": 1,
    },
    {
        "loss": 3.5,
        "gqc/microbatches": 3.0,
        "gqc/grad_norm": 0.8,
        "gqc/threshold": 0.85,
        "gqc/tokens": 256.0,
        "gqc/microbatches_total": 4,
        "gqc/capped_steps": 1,
        "gqc/skipped_windows": 1,
        "step": 2,
    },
    {"eval_loss": 3.7, "step": 2},
    {"train_runtime": 1.0, "gqc/total_steps": 2, "step": 2},
]


def test_summary_numbers():
    s = summarize(HISTORY)
    assert s["logged_steps"] == 2 and s["microbatches_per_step_mean"] == 2.0
    assert s["microbatches_per_step_max"] == 3.0 and s["microbatches_total"] == 4
    assert s["capped_steps"] == 1 and s["skipped_windows"] == 1 and s["final_eval_loss"] == 3.7


def test_cli_reads_latest_checkpoint_and_writes_pngs(tmp_path, capsys):
    for step, hist in ((1, HISTORY[:1]), (2, HISTORY)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "trainer_state.json").write_text(json.dumps({"log_history": hist}))
    assert main([str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["logged_steps"] == 2
    for p in out["plots"]:
        with open(p, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_clear_error_without_state(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "trainer_state.json" in capsys.readouterr().err
