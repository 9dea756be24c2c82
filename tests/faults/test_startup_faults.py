"""What must fail at startup, in one line, before any model load or tokenization: unwritable / full
output directories, bad data files, out-of-range numbers; and the temporaries a dead process left behind.

Read-only directories are simulated by making the write probe raise (``EROFS`` / ``ENOSPC``): root ignores
``chmod`` (one real ``chmod`` case runs for other users).
"""

from __future__ import annotations

import errno
import json
import os

import pytest

from hf_gradext.cli import main as cli_main
from hf_gradext.store import disk, ensure_writable_dir, write_json_atomic
from hf_gradext.store.disk import probe_writable
from tests.faults._damage import assert_cli_error, assert_one_line, enospc, needs_non_root


@pytest.fixture
def no_tokenization(monkeypatch):
    """Fail the test if the data is tokenized (the checks must come first)."""
    import hf_gradext.data as data

    def tokenize(*args, **kwargs):
        raise AssertionError("tokenized before the check")

    monkeypatch.setattr(data, "tokenize_and_group", tokenize)


@pytest.fixture
def no_model(monkeypatch):
    import hf_gradext.models as models

    def load(*args, **kwargs):
        raise AssertionError("model loaded before the check")

    monkeypatch.setattr(models, "load_model", load)


def _failing_probe(monkeypatch, target, error):
    real = disk._probe

    def probe(base):
        if str(base).startswith(str(target)):
            raise OSError(error, os.strerror(error))
        return real(base)

    monkeypatch.setattr(disk, "_probe", probe)


# ------------------------------------------------------------------------------------- output directories
@pytest.mark.parametrize("error", [errno.EROFS, errno.ENOSPC])
@pytest.mark.parametrize(
    ("flag", "extra"),
    [
        ("--output_dir", []),
        ("--proj_output_dir", ["--project_gradients"]),
        ("--gradient_collection_dir", ["--collect_gradients", "--gradient_collection_save", "norms"]),
    ],
)
def test_unwritable_output_dir_fails_before_the_model_and_the_data(
    tmp_path, monkeypatch, capsys, no_model, no_tokenization, flag, extra, error
):
    out = tmp_path / "out"
    target = tmp_path / "target"
    target.mkdir()
    argv = ["train", "--output_dir", str(out if flag != "--output_dir" else target), *extra]
    if flag != "--output_dir":
        argv += [flag, str(target)]
    _failing_probe(monkeypatch, target, error)
    line = assert_cli_error(cli_main(argv), capsys, flag, str(target))
    assert ("free disk space" if error == errno.ENOSPC else "writable") in line
    assert not out.exists()  # nothing written, not even the output directory


@needs_non_root
def test_real_read_only_output_dir(tmp_path, capsys, no_model, no_tokenization):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert_cli_error(cli_main(["train", "--output_dir", str(locked / "out")]), capsys, "--output_dir")


def test_project_with_a_nearly_full_disk_fails_before_the_model(tmp_path, monkeypatch, capsys):
    import hf_gradext.projection.dataset_pass as dataset_pass

    monkeypatch.setattr(dataset_pass, "load_model_for_pass", lambda *a, **k: pytest.fail("model loaded"))
    out = tmp_path / "proj"
    _failing_probe(monkeypatch, out, errno.ENOSPC)
    code = cli_main(["project", "--output_dir", str(out), "--device", "cpu"])
    assert_cli_error(code, capsys, "--output_dir", "No space left", "free disk space")


def test_json_side_file_on_a_full_disk_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch):
    write_json_atomic(tmp_path / "run_config.json", {"x": 1})
    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(ValueError) as err:
        write_json_atomic(tmp_path / "run_config.json", {"x": 2}, flag="--proj_output_dir")
    assert_one_line(str(err.value), "run_config.json", "--proj_output_dir", "No space left")
    assert json.loads((tmp_path / "run_config.json").read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["run_config.json"]


def test_stale_temporaries_of_dead_processes_are_removed_on_the_next_start(tmp_path):
    dead = [
        tmp_path / ".metadata.json.tmp-999999999",
        tmp_path / ".proj-rank000-000003.safetensors.tmp-999999998",
    ]
    live = tmp_path / f".run_config.json.tmp-{os.getppid()}"  # a live process: its write is in progress
    for path in [*dead, live]:
        path.write_bytes(b"x" * 4096)
    other = tmp_path / ".notes.tmp-old"  # not one of ours (no PID): left alone
    other.write_text("keep")
    ensure_writable_dir(tmp_path, "--proj_output_dir")
    assert not any(p.exists() for p in dead) and live.exists() and other.exists()
    assert not [p for p in tmp_path.iterdir() if "write-probe" in p.name]


def test_probe_creates_nothing(tmp_path):
    probe_writable(tmp_path / "a" / "b", "--output_dir")
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------------- bad input
def test_csv_without_a_text_column_is_refused_naming_text_column(tmp_path, capsys, no_tokenization):
    data = tmp_path / "reviews.csv"
    data.write_text("id,label\n1,good\n2,bad\n")
    code = cli_main(["train", "--train_file", str(data), "--output_dir", str(tmp_path / "out")])
    assert_cli_error(code, capsys, "--text_column", "reviews.csv", "id, label")


def test_json_text_column_of_numbers_is_refused(tmp_path, capsys, no_tokenization):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": "a b c", "n": i}) + "\n" for i in range(20)))
    code = cli_main(
        ["train", "--train_file", str(data), "--text_column", "n", "--output_dir", str(tmp_path / "o")]
    )
    assert_cli_error(code, capsys, "--text_column", "int64")


def test_probe_file_that_is_not_json_fails_before_tokenization(tmp_path, capsys, no_tokenization):
    probe = tmp_path / "probe.jsonl"
    probe.write_text('{"text": "a"}\n{"text": \n')
    argv = [
        "train", "--output_dir", str(tmp_path / "o"), "--collect_gradients", "--gradient_collection_mode", "separate",
        "--gradient_collection_probe_file", str(probe),
    ]  # fmt: skip
    assert_cli_error(cli_main(argv), capsys, "--gradient_collection_probe_file", "line 2")


def test_early_stopping_without_evaluation_fails_before_tokenization(tmp_path, capsys, no_tokenization):
    argv = [
        "train", "--output_dir", str(tmp_path / "o"), "--validation_split_percentage", "0",
        "--early_stopping_patience", "2", "--eval_strategy", "steps",
    ]  # fmt: skip
    assert_cli_error(cli_main(argv), capsys, "--early_stopping_patience", "evaluation set")


def test_fresh_run_into_rows_is_refused_before_tokenization(tmp_path, capsys, no_tokenization):
    from tests.faults.test_projection_faults import make_projection_dir

    rows = make_projection_dir(tmp_path / "proj")
    argv = [
        "train",
        "--output_dir",
        str(tmp_path / "o"),
        "--project_gradients",
        "--proj_output_dir",
        str(rows),
    ]
    assert_cli_error(cli_main(argv), capsys, "--proj_output_dir", "--overwrite_output_dir")


# ------------------------------------------------------------------------------- numbers out of range
OUT_OF_RANGE = {
    "--per_device_train_batch_size": "0",
    "--per_device_eval_batch_size": "-1",
    "--max_steps": "-3",
    "--learning_rate": "nan",
    "--num_train_epochs": "-1",
    "--gradient_accumulation_steps": "0",
    "--max_grad_norm": "-1",
    "--warmup_steps": "-5",
    "--weight_decay": "inf",
    "--adam_beta1": "1.5",
    "--seed": "-1",
    "--logging_steps": "0",
    "--save_steps": "0",
    "--dataloader_num_workers": "-2",
    "--gqc_max_microbatches": "0",  # range-checked even without --gqc
    "--gqc_warmup_ratio": "1.0",
    "--proj_seed": "-7",
    "--early_stopping_threshold": "-0.1",
    "--gradient_collection_memory_budget_mb": "nan",
}


@pytest.mark.parametrize("flag", list(OUT_OF_RANGE))
def test_out_of_range_numbers_fail_at_parse_time(tmp_path, capsys, no_model, flag):
    code = cli_main(["train", "--output_dir", str(tmp_path / "o"), flag, OUT_OF_RANGE[flag]])
    assert_cli_error(code, capsys, flag)
    assert not (tmp_path / "o").exists()


def test_in_range_values_still_parse():
    from hf_gradext.arguments.parsing import parse_args

    args = parse_args(["--output_dir", "x", "--max_steps", "-1", "--warmup_steps", "0.1", "--seed", "0"])
    assert args.max_steps == -1 and args.seed == 0
