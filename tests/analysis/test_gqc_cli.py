"""``hf-gradext analyze gqc``: summary numbers and PNGs from a synthetic trainer_state.json."""

from __future__ import annotations

import json

import pytest

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


def test_capped_flags_follow_the_running_count():
    from hf_gradext.analysis.gqc_cli import capped_flags

    steps = [{"gqc/capped_steps": c} for c in (0, 1, 1, 3, 3)]
    assert capped_flags(steps) == [False, True, False, True, False]
    assert capped_flags([{}, {}]) == [False, False]


def _figures(monkeypatch, history, controller):
    import hf_gradext.analysis.plots as plots
    from hf_gradext.analysis.gqc_cli import plot

    saved = {}
    monkeypatch.setattr(
        plots, "save_figure", lambda fig, path: saved.__setitem__(str(path).rsplit("/", 1)[-1], fig)
    )
    plot(history, "unused-dir-not-written", controller)
    return saved


@pytest.mark.parametrize(
    "controller, threshold_label",
    [
        ("gnts", None),
        ("sbc", "logical batch size\n(samples)"),
        (None, "threshold\n(in the controller's units)"),
    ],
)
def test_norm_plot_labels_units_and_marks_capped_steps(monkeypatch, tmp_path, controller, threshold_label):
    monkeypatch.chdir(tmp_path)
    figs = _figures(monkeypatch, HISTORY, controller)
    fig = figs["gqc_norm_vs_threshold.png"]
    axes = fig.axes
    assert len(axes) == (1 if controller == "gnts" else 2)
    assert axes[0].get_ylabel() == "L2 norm of the window's\nmean gradient"
    assert axes[-1].get_xlabel() == "optimizer step"
    if threshold_label:
        assert axes[1].get_ylabel() == threshold_label
    # The capped step (step 2: gqc/capped_steps went 0 -> 1) is marked at its norm.
    marks = [c.get_offsets().tolist() for c in axes[0].collections]
    assert marks == [[[2.0, 0.8]]]
    k_marks = [c.get_offsets().tolist() for c in figs["gqc_microbatches.png"].axes[0].collections]
    assert k_marks == [[[2.0, 3.0]]]
    assert all(ax.get_title() == "" or "GQC" in ax.get_title() for ax in axes)
    for f in figs.values():
        import matplotlib.pyplot as plt

        plt.close(f)


def test_cli_names_the_controller_from_gqc_state(tmp_path, capsys, monkeypatch):
    from hf_gradext.analysis.gqc_cli import find_controller

    d = tmp_path / "checkpoint-2"
    d.mkdir()
    (d / "trainer_state.json").write_text(json.dumps({"log_history": HISTORY}))
    assert find_controller(str(d / "trainer_state.json"), str(tmp_path)) is None
    (d / "gqc_state.json").write_text(json.dumps({"version": 1, "core": {"controller": "sbc"}}))
    assert find_controller(str(d / "trainer_state.json"), str(tmp_path)) == "sbc"
    # The output dir's own trainer_state.json: the controller comes from the latest checkpoint.
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": HISTORY}))
    assert find_controller(str(tmp_path / "trainer_state.json"), str(tmp_path)) == "sbc"
    (d / "gqc_state.json").write_text("{broken")
    assert main([str(tmp_path)]) == 2
    assert "gqc_state.json" in capsys.readouterr().err
