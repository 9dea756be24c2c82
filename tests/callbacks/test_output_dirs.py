"""The output-directory policy inside training, for both row writers (issue #11, item 5).

Gradient collection (``--gradient_collection_dir``) and ``--project_gradients`` (``--proj_output_dir``):
a fresh run refuses another run's rows, ``--overwrite_output_dir`` replaces them (logged), a resumed run
continues only rows of the same settings and of the weights recorded at its checkpoint.
"""

import json
import logging

import pytest

from hf_gradext.store import iter_index, list_shards
from hf_gradext.store.policy import FINGERPRINT_FILE, OutputDirConflict
from tests.collection._tiny import make_trainer, tiny_gpt2

COLLECT = dict(gradient_collection_save="norms")
PROJECT = dict(
    collect_gradients=False,
    project_gradients=True,
    proj_rank_total=16,
    proj_rank_min=2,
    proj_dtype="float32",
)
WRITERS = {"collection": ("gradients", COLLECT), "projection": ("projections", PROJECT)}


def _run(out, writer, resume=None, **kw):
    subdir, flags = WRITERS[writer]
    trainer = make_trainer(out, **{**flags, **kw})
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _steps(directory):
    return sorted({r["step"] for r in iter_index(directory)})


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_fresh_run_into_another_runs_rows_refuses_and_touches_nothing(tmp_path, writer):
    _run(tmp_path, writer, max_steps=2)
    directory = tmp_path / WRITERS[writer][0]
    before = _snapshot(directory)
    again = make_trainer(tmp_path, **{**WRITERS[writer][1], "max_steps": 2})
    with pytest.raises(OutputDirConflict, match="--overwrite_output_dir.*--resume_from_checkpoint") as err:
        again.train()
    assert "\n" not in str(err.value) and str(directory) in str(err.value)
    assert again.state.global_step == 0  # refused before the first step
    assert _snapshot(directory) == before


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_overwrite_removes_the_earlier_rows_and_says_so(tmp_path, writer, caplog):
    _run(tmp_path, writer, max_steps=3, model=tiny_gpt2(seed=0))
    with caplog.at_level(logging.WARNING):
        _run(tmp_path, writer, max_steps=2, model=tiny_gpt2(seed=1), overwrite_output_dir=True)
    directory = tmp_path / WRITERS[writer][0]
    assert _steps(directory) == [1, 2]  # only the new run's steps, nothing appended to the old ones
    assert "--overwrite_output_dir" in caplog.text and "removed" in caplog.text
    assert (directory / FINGERPRINT_FILE).is_file()


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_resume_of_the_same_run_continues_its_rows(tmp_path, writer):
    common = dict(save_strategy="steps", save_steps=2)
    _run(tmp_path, writer, max_steps=3, **common)
    _run(tmp_path, writer, max_steps=4, resume=str(tmp_path / "checkpoint-2"), **common)
    directory = tmp_path / WRITERS[writer][0]
    assert _steps(directory) == [1, 2, 3, 4]
    # The weights of every checkpoint are on record (step 0: the start), checked by the next resume.
    models = json.loads((directory / FINGERPRINT_FILE).read_text())["models"]
    assert sorted(models, key=int) == ["0", "2", "4"] and models["0"] != models["2"] != models["4"]


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_resume_with_other_settings_refuses(tmp_path, writer):
    common = dict(save_strategy="steps", save_steps=2)
    _run(tmp_path, writer, max_steps=2, **common)
    directory = tmp_path / WRITERS[writer][0]
    before = _snapshot(directory)
    other = dict(gradient_collection_layers="attn") if writer == "collection" else dict(proj_seed=7)
    with pytest.raises(OutputDirConflict, match="other settings"):
        _run(tmp_path, writer, max_steps=4, resume=str(tmp_path / "checkpoint-2"), **common, **other)
    assert _snapshot(directory) == before


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_resume_of_another_models_checkpoint_into_these_rows_refuses(tmp_path, writer):
    common = dict(save_strategy="steps", save_steps=2)
    _run(tmp_path / "a", writer, max_steps=2, model=tiny_gpt2(seed=0), **common)
    rows_of_a = tmp_path / "a" / WRITERS[writer][0]
    _run(tmp_path / "b", writer, max_steps=2, model=tiny_gpt2(seed=1), **common)
    before = _snapshot(rows_of_a)
    into_a = (
        dict(gradient_collection_dir=str(rows_of_a))
        if writer == "collection"
        else dict(proj_output_dir=str(rows_of_a))
    )
    with pytest.raises(OutputDirConflict, match="another model"):
        _run(
            tmp_path / "b",
            writer,
            max_steps=4,
            resume=str(tmp_path / "b" / "checkpoint-2"),
            **common,
            **into_a,
        )
    assert _snapshot(rows_of_a) == before


def test_on_error_warn_does_not_hide_a_refusal(tmp_path):
    _run(tmp_path, "collection", max_steps=1)
    with pytest.raises(OutputDirConflict):
        _run(tmp_path, "collection", max_steps=1, gradient_collection_on_error="warn")


def test_a_run_without_rows_leaves_no_stale_side_files(tmp_path):
    directory = tmp_path / "projections"
    directory.mkdir()
    (directory / "metadata.json").write_text("{}")  # e.g. a run that died before its first shard
    (directory / "notes.txt").write_text("mine")
    _run(tmp_path, "projection", max_steps=1)
    assert list_shards(directory) and (directory / "notes.txt").read_text() == "mine"
    assert (directory / "metadata.json").read_text() != "{}"
