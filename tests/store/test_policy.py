"""The output-directory policy (hf_gradext.store.policy) on its own: modes, ranks, fingerprints."""

import copy
import json
import logging
import subprocess
import sys

import pytest
import torch

from hf_gradext.errors import UserFacingError
from hf_gradext.store import ShardWriter, list_shards
from hf_gradext.store.policy import (
    FINGERPRINT_FILE,
    OutputDir,
    OutputDirConflict,
    RunFingerprint,
    choose_mode,
    model_fingerprint,
    prepare_output_dir,
    read_fingerprint,
    record_model,
    refuse_fresh_into_rows,
    training_mode,
)
from tests.helpers import make_tiny_gpt2

SETTINGS = {"layers": ["h.0.mlp.c_fc"], "dim": 16, "seed": 42, "dtype": "float32"}


def _out(tmp_path):
    return OutputDir(
        tmp_path, "rows", "--dir", "--overwrite", "--resume", side_files=("meta.json", ".cache/*.bin")
    )


def _shard(tmp_path, rank=0):
    with ShardWriter(tmp_path, prefix="rows", rank=rank) as writer:
        writer.write({"x": torch.zeros(1)}, [{"example_id": 0}])


def _fp(model="sha256:aaaa", **settings):
    return RunFingerprint("writer", {**SETTINGS, **settings}, model)


def test_fresh_into_rows_refuses_in_one_line_naming_every_flag(tmp_path):
    out = _out(tmp_path)
    prepare_output_dir(out, "fresh", _fp())  # empty: fine
    _shard(tmp_path)
    for check in (
        lambda: refuse_fresh_into_rows(out, "fresh"),
        lambda: prepare_output_dir(out, "fresh", _fp()),
    ):
        with pytest.raises(OutputDirConflict) as err:
            check()
        message = str(err.value)
        assert "\n" not in message and all(f in message for f in ("--dir=", "--overwrite", "--resume"))
    assert len(list_shards(tmp_path)) == 1


def test_overwrite_removes_only_the_writers_files_and_logs_them(tmp_path, caplog):
    out = _out(tmp_path)
    prepare_output_dir(out, "fresh", _fp())
    _shard(tmp_path)
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "rows.bin").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not ours")
    _shard(tmp_path / "elsewhere")  # not this directory
    with caplog.at_level(logging.WARNING):
        prepare_output_dir(out, "overwrite", _fp(model="sha256:bbbb"))
    assert list_shards(tmp_path) == [] and not (tmp_path / "meta.json").exists()
    assert not (tmp_path / ".cache" / "rows.bin").exists() and (tmp_path / "notes.txt").exists()
    assert "--overwrite" in caplog.text and "rows-rank000-000000.safetensors" in caplog.text
    assert read_fingerprint(tmp_path)["models"] == {"0": "sha256:bbbb"}


def test_overwrite_each_rank_removes_its_own_shards_rank0_the_rest(tmp_path):
    out = _out(tmp_path)
    for rank in (0, 1, 2):
        _shard(tmp_path, rank)
    prepare_output_dir(out, "overwrite", _fp(), rank=1, world_size=2)
    assert sorted(s.rank for s in list_shards(tmp_path)) == [0, 2]
    assert not (tmp_path / FINGERPRINT_FILE).exists()  # rank 0 writes it
    prepare_output_dir(out, "overwrite", _fp(), rank=0, world_size=2)
    assert list_shards(tmp_path) == [] and (tmp_path / FINGERPRINT_FILE).exists()


def test_resume_matches_or_names_the_difference(tmp_path):
    out = _out(tmp_path)
    prepare_output_dir(out, "fresh", _fp())
    _shard(tmp_path)
    prepare_output_dir(out, "resume", _fp())  # same everything: fine
    with pytest.raises(OutputDirConflict, match=r"other settings \(dim: 16 -> 32, seed: 42 -> 7\)"):
        prepare_output_dir(out, "resume", _fp(dim=32, seed=7))
    with pytest.raises(OutputDirConflict, match="another model"):
        prepare_output_dir(out, "resume", _fp(model="sha256:bbbb"))
    with pytest.raises(OutputDirConflict, match="holds rows of 'writer', not 'other'"):
        prepare_output_dir(out, "resume", RunFingerprint("other", SETTINGS, "sha256:aaaa"))
    (tmp_path / FINGERPRINT_FILE).unlink()  # rows of an older version or another tool
    with pytest.raises(OutputDirConflict, match="no run_fingerprint.json"):
        prepare_output_dir(out, "resume", _fp())
    assert len(list_shards(tmp_path)) == 1


def test_training_checkpoints_are_recorded_and_later_ones_dropped_on_resume(tmp_path):
    out = _out(tmp_path)
    prepare_output_dir(out, "fresh", _fp(model="sha256:s0"))
    _shard(tmp_path)
    record_model(out, 2, "sha256:s2")
    record_model(out, 4, "sha256:s4")
    assert read_fingerprint(tmp_path)["models"] == {"0": "sha256:s0", "2": "sha256:s2", "4": "sha256:s4"}
    with pytest.raises(
        OutputDirConflict, match=r"no record of the model at step 3 \(recorded steps: \[0, 2, 4\]\)"
    ):
        prepare_output_dir(out, "resume", _fp(model="sha256:s3"), step=3)
    prepare_output_dir(out, "resume", _fp(model="sha256:s2"), step=2)
    assert read_fingerprint(tmp_path)["models"] == {"0": "sha256:s0", "2": "sha256:s2"}
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # atomic writes leave no temp file


def test_modes_from_flags():
    assert choose_mode(False, False, "--o", "--r") == "fresh"
    assert choose_mode(True, False, "--o", "--r") == "overwrite"
    assert choose_mode(False, True, "--o", "--r") == "resume"
    with pytest.raises(UserFacingError, match="--o and --r exclude each other"):
        choose_mode(True, True, "--o", "--r")

    class Args:
        overwrite_output_dir = False

    class State:
        global_step = 0

    assert training_mode(Args(), State()) == "fresh"
    State.global_step = 3
    assert training_mode(Args(), State()) == "resume"
    Args.overwrite_output_dir = True
    assert training_mode(Args(), State()) == "overwrite"


def test_model_fingerprint_sees_weights_dtype_and_architecture():
    model = make_tiny_gpt2(seed=0)
    fp = model_fingerprint(model)
    assert fp.startswith("sha256:") and fp == model_fingerprint(copy.deepcopy(model))
    assert fp != model_fingerprint(make_tiny_gpt2(seed=1))
    assert fp != model_fingerprint(copy.deepcopy(model).to(torch.float64))
    assert fp != model_fingerprint(make_tiny_gpt2(seed=0, n_layer=1))
    stepped = copy.deepcopy(model)
    with torch.no_grad():
        for p in stepped.parameters():
            p.add_(1e-3 * torch.randn_like(p))  # what any optimizer step does to sampled elements
    assert fp != model_fingerprint(stepped)


def test_model_fingerprint_is_the_same_in_another_process():
    code = (
        "from hf_gradext.store.policy import model_fingerprint; from tests.helpers import make_tiny_gpt2; "
        "print(model_fingerprint(make_tiny_gpt2(seed=0)))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert other.stdout.strip() == model_fingerprint(make_tiny_gpt2(seed=0))


def test_fingerprint_file_is_plain_json(tmp_path):
    prepare_output_dir(_out(tmp_path), "fresh", RunFingerprint("w", {"layers": ("a", "b")}, "sha256:x"))
    stored = json.loads((tmp_path / FINGERPRINT_FILE).read_text())
    assert stored["settings"] == {"layers": ["a", "b"]} and stored["writer"] == "w"
    assert "strided" in stored["fingerprint_method"]
