"""End-to-end ``hf-gradext project | full-grads | attribute`` on a tiny from-scratch GPT-2 (embedded corpus)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from hf_gradext.projection import KroneckerProjector, load_projections
from hf_gradext.projection.cli import attribute_main, full_grads_main, project_main
from hf_gradext.projection.full_grads import load_full_grads
from hf_gradext.store import iter_index
from tests.helpers import accelerate_launch

MODEL = ["--config_overrides", "n_layer=2,n_embd=32,n_head=2", "--block_size", "16", "--seed", "3"]
PROJ = [
    "--proj_rank_total",
    "16",
    "--proj_rank_min",
    "2",
    "--proj_dtype",
    "float32",
    "--device",
    "cpu",
    "--disable_tqdm",
]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _project(out, *extra):
    return project_main([*MODEL, *PROJ, "--output_dir", str(out), *extra])


def _subprocess_project(out, *extra, env=None):
    cmd = [sys.executable, "-m", "hf_gradext.cli", "project", *MODEL, *PROJ, "--output_dir", str(out), *extra]
    return subprocess.run(cmd, env=env or ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    assert _project(out, "--max_samples", "12", "--batch_size", "4", "--proj_save_interval", "2") == 0
    return out


def test_project_writes_rows_metadata_stats_and_snippets(reference_run):
    rows, ids, meta = load_projections(reference_run)
    assert (
        ids == list(range(12)) and rows.shape == (12, meta["total_proj_dim"]) and rows.dtype == torch.float32
    )
    stats = json.loads((reference_run / "projection_stats.json").read_text())
    assert stats["rows_in_directory"] == 12 and stats["tokens"] == 12 * 16 and stats["tokens_per_second"] > 0
    run_config = json.loads((reference_run / "run_config.json").read_text())
    assert run_config["projection"]["proj_rank_total"] == 16
    index = [r for r in iter_index(reference_run, "proj")]
    assert all(r["snippet"] for r in index)


def test_resume_skips_done_examples_and_rejects_other_settings(reference_run, capsys):
    assert _project(reference_run, "--max_samples", "12", "--batch_size", "4", "--resume") == 0
    assert json.loads((reference_run / "projection_stats.json").read_text())["skipped_already_done"] == 12
    assert _project(reference_run, "--max_samples", "12", "--proj_seed", "7", "--resume") == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "proj_seed: 42 -> 7" in err


def test_different_batch_size_gives_same_rows(reference_run, tmp_path):
    assert _project(tmp_path, "--max_samples", "12", "--batch_size", "3") == 0
    ref, _, _ = load_projections(reference_run)
    rows, _, _ = load_projections(tmp_path)
    torch.testing.assert_close(rows, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_killed_run_resumes_without_duplicates_or_gaps(reference_run, tmp_path):
    args = ("--max_samples", "12", "--batch_size", "2", "--proj_save_interval", "1")
    killed = _subprocess_project(tmp_path, *args, env={**ENV, "HF_GRADEXT_TEST_KILL_AFTER_BATCHES": "3"})
    assert killed.returncode == 137, killed.stderr[-2000:]
    _, partial_ids, _ = load_projections(tmp_path)
    assert partial_ids == list(range(6))
    resumed = _subprocess_project(tmp_path, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows, ids, _ = load_projections(tmp_path)
    assert ids == list(range(12))  # no duplicate, no gap
    ref, _, _ = load_projections(reference_run)
    torch.testing.assert_close(rows, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_accelerate_launch_gives_same_rows(reference_run, tmp_path):
    out = tmp_path / "ddp"
    args = ["-m", "hf_gradext.cli", "project", *MODEL, *PROJ, "--output_dir", str(out)]
    result = accelerate_launch([*args, "--max_samples", "12", "--batch_size", "4"], env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows, ids, _ = load_projections(out)
    ranks = {r["rank"] for r in iter_index(out, "proj")}
    assert ranks == {0, 1} and ids == list(range(12))
    ref, _, _ = load_projections(reference_run)
    torch.testing.assert_close(rows, ref, rtol=1e-4, atol=1e-6)
    assert json.loads((out / "projection_stats.json").read_text())["world_size"] == 2


def test_full_grads_naive_projection_equals_kronecker_rows(reference_run, tmp_path):
    out = tmp_path / "fg"
    assert (
        full_grads_main(
            [
                *MODEL,
                "--output_dir",
                str(out),
                "--max_samples",
                "4",
                "--batch_size",
                "2",
                "--layers",
                "projected",
                "--proj_metadata",
                str(reference_run),
            ]
        )
        == 0
    )
    grads, ids, meta = load_full_grads(out)
    assert ids == [0, 1, 2, 3]
    proj_meta = json.loads((reference_run / "metadata.json").read_text())
    # naive projection of the exact weight gradients with P rebuilt from metadata.json
    from hf_gradext.projection.kronecker import naive_project
    from hf_gradext.projection.matrices import make_factors

    parts = []
    for layer in proj_meta["layers"]:
        sl = meta["param_slices"][layer["weight_name"]]
        g = grads[:, sl["start"] : sl["end"]].reshape(-1, *sl["shape"]).double()
        p_in, p_out = make_factors(
            layer["name"],
            layer["d_in"],
            layer["d_out"],
            layer["k_i"],
            layer["k_o"],
            proj_meta["proj_seed"],
            proj_meta["proj_method"],
        )
        parts.append(naive_project(g, p_in, p_out, layer["layout"]))
    naive = torch.cat(parts, 1)
    rows, _, _ = load_projections(reference_run)
    assert float((rows[:4].double() - naive).abs().max() / naive.abs().max()) < 1e-4  # float32 model


def test_attribute_writes_json_and_csv(reference_run, tmp_path):
    query = tmp_path / "q"
    assert _project(query, "--max_samples", "3", "--split", "validation") == 0
    prefix = tmp_path / "attr"
    assert (
        attribute_main(
            [
                "--train",
                str(reference_run),
                "--query",
                str(query),
                "--top_k",
                "4",
                "--output",
                str(prefix),
                "--damping",
                "0.1",
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "attr.json").read_text())
    assert len(result["results"]) == 3 and all(len(r["top"]) == 4 for r in result["results"])
    assert all(r["top"][0]["snippet"] for r in result["results"])
    lines = (tmp_path / "attr.csv").read_text().strip().splitlines()
    assert lines[0].startswith("query_example_id,rank,train_example_id,score") and len(lines) == 1 + 12


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    assert project_main([*MODEL, "--output_dir", str(tmp_path), "--proj_rank_total", "10"]) == 2
    assert project_main([*MODEL, "--output_dir", str(tmp_path), "--proj_dtype", "int8"]) == 2
    assert full_grads_main([*MODEL, "--output_dir", str(tmp_path)]) == 2
    assert attribute_main(["--train", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err)


def test_projector_from_run_metadata_matches_stored_rows(reference_run):
    """Rebuilding the projector from metadata.json on the same model reproduces the stored rows."""
    from transformers import set_seed

    from hf_gradext.arguments.model import ModelDataArguments
    from hf_gradext.projection.dataset_pass import (
        ProjectRunArguments,
        load_data_for_pass,
        load_model_for_pass,
    )

    margs = ModelDataArguments(config_overrides="n_layer=2,n_embd=32,n_head=2", block_size=16)
    margs._validate_model_data()
    set_seed(0)
    rargs = ProjectRunArguments(max_samples=4, seed=3)
    tokenizer, model = load_model_for_pass(margs, rargs, 16)
    data = load_data_for_pass(margs, rargs, tokenizer)
    proj = KroneckerProjector.from_metadata(reference_run, model.eval())
    batch = {k: torch.as_tensor(data[:4][k]) for k in ("input_ids", "labels")}  # blocks: no mask
    rows, _, _ = load_projections(reference_run)
    torch.testing.assert_close(proj.project(batch), rows[:4], rtol=1e-4, atol=1e-6)


def test_bad_layers_fail_before_the_datasets(tmp_path, monkeypatch, capsys):
    import hf_gradext.data
    from hf_gradext.projection.cli import project_main

    def too_late(*args, **kwargs):
        raise AssertionError("the datasets were built before the projector was checked")

    monkeypatch.setattr(hf_gradext.data, "build_datasets", too_late)
    argv = [
        "--output_dir",
        str(tmp_path / "p"),
        "--proj_layers",
        "zzz",
        "--max_samples",
        "2",
        "--disable_tqdm",
    ]
    assert project_main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --proj_layers=zzz: ")


# ------------------------------------------------------------------ output-directory policy (issue #11, item 5)
def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_project_into_rows_of_an_earlier_run_refuses_before_loading_the_model(
    reference_run, monkeypatch, capsys
):
    import hf_gradext.projection.dataset_pass as dataset_pass

    def too_late(*args, **kwargs):
        raise AssertionError("the model was loaded before the directory was checked")

    monkeypatch.setattr(dataset_pass, "load_model_for_pass", too_late)
    before = _files(reference_run)
    assert _project(reference_run, "--max_samples", "12") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds" in err[0] and "--overwrite" in err[0] and "--resume" in err[0]
    assert _files(reference_run) == before


def test_project_overwrite_replaces_the_rows_of_another_model(reference_run, tmp_path, caplog):
    import logging

    out = tmp_path / "p"
    assert _project(out, "--max_samples", "6", "--seed", "4") == 0  # another from-scratch model
    with caplog.at_level(logging.WARNING):
        assert _project(out, "--max_samples", "12", "--batch_size", "4", "--overwrite") == 0
    assert "--overwrite" in caplog.text and "removed" in caplog.text
    rows, ids, _ = load_projections(out)
    ref, ref_ids, _ = load_projections(reference_run)
    assert ids == ref_ids
    torch.testing.assert_close(rows, ref, rtol=1e-4, atol=1e-6)  # nothing of the other model is left


def test_project_resume_with_another_model_or_data_refuses(reference_run, tmp_path, capsys):
    out = tmp_path / "p"
    assert _project(out, "--max_samples", "4") == 0
    before = _files(out)
    assert _project(out, "--max_samples", "8", "--seed", "4", "--resume") == 2
    assert "another model" in capsys.readouterr().err
    assert _project(out, "--max_samples", "8", "--split", "validation", "--resume") == 2
    assert "other settings (data" in capsys.readouterr().err
    assert _files(out) == before
    assert _project(out, "--max_samples", "8", "--resume") == 0  # the same model and settings: continues
    _, ids, _ = load_projections(out)
    assert ids == list(range(8))


def test_project_overwrite_and_resume_together_is_an_error(tmp_path, capsys):
    assert _project(tmp_path, "--overwrite", "--resume") == 2
    assert "exclude each other" in capsys.readouterr().err


def _full_grads(out, *extra):
    return full_grads_main([*MODEL, "--output_dir", str(out), "--batch_size", "2", *extra])


def test_full_grads_refuses_overwrites_and_resumes(tmp_path, capsys, caplog):
    import logging

    out, ref = tmp_path / "fg", tmp_path / "ref"
    assert _full_grads(ref, "--max_samples", "4", "--layers", "mlp") == 0
    assert _full_grads(out, "--max_samples", "2", "--layers", "mlp") == 0
    before = _files(out)
    # fresh into rows: refused, nothing touched
    assert _full_grads(out, "--max_samples", "4", "--layers", "mlp") == 2
    assert "already holds" in capsys.readouterr().err and _files(out) == before
    # resume with other settings / another model: refused, nothing touched
    assert _full_grads(out, "--max_samples", "4", "--layers", "attn", "--resume") == 2
    assert "other settings" in capsys.readouterr().err
    assert _full_grads(out, "--max_samples", "4", "--layers", "mlp", "--seed", "4", "--resume") == 2
    assert "another model" in capsys.readouterr().err
    assert _files(out) == before
    # resume of the same run: only the missing examples are computed
    assert _full_grads(out, "--max_samples", "4", "--layers", "mlp", "--resume") == 0
    assert "2 already done" in capsys.readouterr().out
    grads, ids, _ = load_full_grads(out)
    ref_grads, ref_ids, _ = load_full_grads(ref)
    assert ids == ref_ids == [0, 1, 2, 3]
    torch.testing.assert_close(grads, ref_grads)
    # overwrite: another model's gradients replace these entirely
    with caplog.at_level(logging.WARNING):
        assert _full_grads(out, "--max_samples", "2", "--layers", "mlp", "--seed", "4", "--overwrite") == 0
    assert "removed" in caplog.text
    grads, ids, _ = load_full_grads(out)
    assert ids == [0, 1] and not torch.allclose(grads, ref_grads[:2])
