"""End-to-end ``hf-gradext train`` runs at a tiny size (in-process, except the bad-input checks)."""

import json
import math

import pytest
import torch

from hf_gradext.train import main, resolve_checkpoint
from tests.helpers import QUICK_TRAIN_FLAGS, logged_losses

QUIET = ["--log_level", "warning"]


def read_json(path):
    return json.loads(path.read_text())


def test_default_train_end_to_end(tmp_path):
    out = tmp_path / "run"
    flags = [*QUICK_TRAIN_FLAGS, "--max_steps", "20"]
    assert main(["--output_dir", str(out), *flags, *QUIET]) == 0
    for name in ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.json"):
        assert (out / name).is_file(), name
    losses = logged_losses(read_json(out / "trainer_state.json")["log_history"])
    assert len(losses) >= 5
    assert losses[-1] < losses[0] - 1.0, losses  # clearly learning
    results = read_json(out / "all_results.json")
    assert {"train_loss", "eval_loss", "eval_accuracy", "perplexity"} <= set(results)
    assert read_json(out / "train_results.json")["train_samples"] == 64
    evals = read_json(out / "eval_results.json")
    assert evals["perplexity"] == pytest.approx(math.exp(evals["eval_loss"]))
    assert 0.0 <= evals["eval_accuracy"] <= 1.0
    assert evals["eval_loss"] < losses[0]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    batch = tok(["Once upon a time, there was a little cat."], return_tensors="pt")
    loss = model(**batch, labels=batch["input_ids"]).loss
    assert torch.isfinite(loss)


def test_finetune_from_a_local_save_pretrained_dir(tmp_path, saved_model_dir):
    """The Hub path (`--model_name_or_path`): a directory written by save_pretrained stands in for an id."""
    from transformers import AutoModelForCausalLM

    data = tmp_path / "train.txt"
    data.write_text("\n".join(f"Lily found {i} red apples in the garden." for i in range(200)) + "\n")
    out = tmp_path / "ft"
    flags = [
        *QUICK_TRAIN_FLAGS,
        "--learning_rate",
        "1e-3",
        "--block_size",
        "32",
        "--validation_split_percentage",
        "10",
    ]
    assert (
        main(
            [
                "--model_name_or_path",
                str(saved_model_dir),
                "--train_file",
                str(data),
                "--output_dir",
                str(out),
                *flags,
                *QUIET,
            ]
        )
        == 0
    )
    before = AutoModelForCausalLM.from_pretrained(saved_model_dir)
    after = AutoModelForCausalLM.from_pretrained(out)
    assert after.config.n_positions == 128  # the pretrained config, not the tiny default
    assert not torch.equal(
        before.transformer.h[0].attn.c_attn.weight, after.transformer.h[0].attn.c_attn.weight
    )
    losses = logged_losses(read_json(out / "trainer_state.json")["log_history"])
    assert losses[-1] < losses[0]


def test_resume_from_checkpoint_continues_identically(tmp_path):
    common = [*QUICK_TRAIN_FLAGS, "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3", *QUIET]
    full = tmp_path / "full"
    assert main(["--output_dir", str(full), *common]) == 0
    assert (full / "checkpoint-3").is_dir() and (full / "checkpoint-6").is_dir()
    # Resume the same run from step 3 in a fresh output dir: it must end where the uninterrupted run did.
    resumed = tmp_path / "resumed"
    assert (
        main(["--output_dir", str(resumed), "--resume_from_checkpoint", str(full / "checkpoint-3"), *common])
        == 0
    )
    state = read_json(resumed / "trainer_state.json")
    assert state["global_step"] == 6
    from safetensors.torch import load_file

    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    # `latest` picks the newest checkpoint-* of --output_dir and continues to a larger max_steps.
    assert resolve_checkpoint("latest", str(full)).endswith("checkpoint-6")
    assert (
        main(["--output_dir", str(full), *common, "--max_steps", "8", "--resume_from_checkpoint", "latest"])
        == 0
    )
    assert read_json(full / "trainer_state.json")["global_step"] == 8
    # A save cut short (no trainer_state.json: it is written last) is never resumed from.
    (full / "checkpoint-8" / "trainer_state.json").unlink()
    assert resolve_checkpoint("latest", str(full)).endswith("checkpoint-6")


def test_resume_errors(tmp_path):
    from hf_gradext.errors import UserFacingError

    with pytest.raises(UserFacingError, match="no complete checkpoint"):
        resolve_checkpoint("True", str(tmp_path))
    with pytest.raises(UserFacingError, match="not a directory"):
        resolve_checkpoint(str(tmp_path / "nope"), str(tmp_path))
    assert resolve_checkpoint(None, str(tmp_path)) is None


def _fake_checkpoint(path, complete: bool, state_text: str = '{"global_step": 1}'):
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(path / "model.safetensors"))  # a checkpoint passes verification
    if complete:
        (path / "trainer_state.json").write_text(state_text)


def test_latest_skips_checkpoints_whose_save_was_interrupted(tmp_path, caplog):
    from hf_gradext.errors import UserFacingError

    _fake_checkpoint(tmp_path / "checkpoint-2", complete=True)
    _fake_checkpoint(tmp_path / "checkpoint-10", complete=True)
    _fake_checkpoint(tmp_path / "checkpoint-12", complete=True, state_text='{"global_st')  # cut mid-write
    _fake_checkpoint(tmp_path / "checkpoint-14", complete=False)  # killed before the state file
    (tmp_path / "checkpoint-99").write_text("a file, not a checkpoint")
    with caplog.at_level("WARNING", logger="hf_gradext.checkpoints"):
        assert resolve_checkpoint("latest", str(tmp_path)) == str(
            tmp_path / "checkpoint-10"
        )  # by step, not name
    skipped = " ".join(r.getMessage() for r in caplog.records)
    assert "checkpoint-14" in skipped and "checkpoint-12" in skipped
    with pytest.raises(UserFacingError, match="was not fully saved"):
        resolve_checkpoint(str(tmp_path / "checkpoint-14"), str(tmp_path))
    assert resolve_checkpoint(str(tmp_path / "checkpoint-2"), str(tmp_path)) == str(tmp_path / "checkpoint-2")
    empty = tmp_path / "only_broken"
    _fake_checkpoint(empty / "checkpoint-3", complete=False)
    with pytest.raises(UserFacingError, match="no complete checkpoint"):
        resolve_checkpoint("latest", str(empty))


def test_early_stopping_stops_before_max_steps(tmp_path):
    out = tmp_path / "es"
    flags = [*QUICK_TRAIN_FLAGS, "--max_steps", "30", "--eval_strategy", "steps", "--eval_steps", "2"]
    # A threshold no improvement can meet: stop after the first evaluation plus `patience` more.
    es = ["--early_stopping_patience", "1", "--early_stopping_threshold", "100"]
    assert main(["--output_dir", str(out), *flags, *es, *QUIET]) == 0
    assert read_json(out / "trainer_state.json")["global_step"] == 4


def test_lora_run_saves_adapters(tmp_path):
    out = tmp_path / "lora"
    assert main(["--output_dir", str(out), *QUICK_TRAIN_FLAGS, "--use_peft", "--lora_r", "4", *QUIET]) == 0
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()


BAD_INPUTS = {
    # case: (argv, substring of the one error line)
    "unknown_flag": (["--no_such_flag", "1"], "unknown flag --no_such_flag"),
    "missing_data_file": (["--train_file", "{tmp}/missing.txt"], "does not exist"),
    "empty_dataset": (["--train_file", "{tmp}/empty.txt"], "fewer than one block"),
    "block_size_above_positions": (["--block_size", "100000"], "exceeds the model's"),
    "invalid_enum": (["--lr_scheduler_type", "sideways"], "invalid choice"),
    "output_dir_is_a_file": (["--output_dir", "{tmp}/not_a_dir"], "is a file"),
    "unreachable_hub_model": (
        ["--model_name_or_path", "no-such-org/no-such-model"],
        "no-such-org/no-such-model",
    ),
}


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory):
    """Run every bad-input case as its own `hf-gradext train` process, all at once (imports dominate)."""
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("bad_inputs")
    (tmp / "empty.txt").write_text("\n\n")  # lines, but no text: no block of tokens
    (tmp / "not_a_dir").write_text("x")
    procs = {}
    for case, (argv, _) in BAD_INPUTS.items():
        argv = [a.format(tmp=tmp) for a in argv]
        if "--output_dir" not in argv:
            argv += ["--output_dir", str(tmp / f"out_{case}")]
        procs[case] = subprocess.Popen(
            [sys.executable, "-m", "hf_gradext.cli", "train", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    results = {case: (p.communicate(timeout=300), p.returncode) for case, p in procs.items()}
    return tmp, results


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_error_no_traceback(bad_input_runs, case):
    tmp, results = bad_input_runs
    (_, stderr), returncode = results[case]
    assert returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, stderr[-3000:]
    assert BAD_INPUTS[case][1] in error_lines[0]
    assert stderr.strip().splitlines()[-1] == error_lines[0]  # the error is the last thing printed
    assert len(stderr) < 2000, stderr
    assert not (tmp / f"out_{case}").exists()  # failed before writing anything


@pytest.mark.parametrize(
    ("flags", "flag"),
    [
        (
            ["--collect_gradients", "--gradient_collection_layers", "nothingmatches"],
            "--gradient_collection_layers",
        ),
        (["--project_gradients", "--proj_layers", "nothingmatches"], "--proj_layers"),
    ],
)
def test_layer_selection_errors_come_before_the_datasets(tmp_path, monkeypatch, capsys, flags, flag):
    import hf_gradext.data

    def too_late(*args, **kwargs):
        raise AssertionError("the datasets were built before the layer selection was checked")

    monkeypatch.setattr(hf_gradext.data, "build_datasets", too_late)
    assert main(["--output_dir", str(tmp_path / "out"), *QUICK_TRAIN_FLAGS, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {flag}=nothingmatches: ") and "matches no module" in err[-1]
