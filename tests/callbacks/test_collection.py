"""PerSampleGradientCallback inside GradExtTrainer: equivalences, statistics, resume, faults, bad input."""

import copy
import errno
import logging

import pytest
import torch
from transformers import HfArgumentParser

from hf_gradext import GradExtArguments
from hf_gradext.analysis import load_gradients
from hf_gradext.errors import UserFacingError
from hf_gradext.grad import SparseRowGrad, per_sample_gradients
from hf_gradext.store import StoreWriteError, iter_index, list_shards
from hf_gradext.store import shards as shards_mod
from tests.collection._tiny import make_trainer, tiny_gpt2, token_rows


def _dense(x):
    return x.to_dense() if isinstance(x, SparseRowGrad) else x


def _stack(rows, ids):
    by_id = {int(r["example_id"]): r for r in rows}
    return {k: torch.stack([by_id[i][k] for i in ids]) for k in ("input_ids", "attention_mask", "labels")}


def test_training_mode_equals_per_sample_gradients_with_accumulation(tmp_path):
    model, rows = tiny_gpt2(), token_rows()
    initial = copy.deepcopy(model).eval()
    trainer = make_trainer(
        tmp_path,
        model=model,
        rows=rows,
        max_steps=1,
        gradient_accumulation_steps=2,
        gradient_collection_max_samples=6,
    )
    trainer.train()
    got = load_gradients(tmp_path / "gradients")
    ids = [s["example_id"] for s in got.samples]
    assert len(ids) == 6 and [s["sample"] for s in got.samples] == list(range(6))
    ref = per_sample_gradients(initial, _stack(rows, ids))
    assert set(got.grads) == set(ref)
    for name, value in ref.items():
        torch.testing.assert_close(_dense(got.grads[name]), _dense(value), rtol=1e-4, atol=1e-6)


def test_training_mode_equals_separate_mode(tmp_path):
    loaded = {}
    for mode in ("training", "separate"):
        trainer = make_trainer(
            tmp_path / mode, max_steps=3, gradient_collection_mode=mode, gradient_collection_steps=2
        )
        trainer.train()
        loaded[mode] = load_gradients(tmp_path / mode / "gradients")
    a, b = loaded["training"], loaded["separate"]
    assert a.steps == b.steps == [2]
    assert [s["example_id"] for s in a.samples] == [s["example_id"] for s in b.samples]
    for name in a.grads:
        torch.testing.assert_close(_dense(a.grads[name]), _dense(b.grads[name]), rtol=1e-4, atol=1e-6)


def test_stats_are_logged_and_equal_numpy_of_stored_norms(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2, gradient_collection_save="norms")
    trainer.train()
    logs = [h for h in trainer.state.log_history if "grad_collection/total/norm_mean" in h]
    assert [h["step"] for h in logs] == [1, 2]
    for group in ("attn", "mlp", "embed", "norm"):
        assert f"grad_collection/{group}/norm_p90" in logs[0]
    assert logs[0]["grad_collection/peak_memory_mb"] >= 0 and logs[0]["grad_collection/samples"] == 4
    data = load_gradients(tmp_path / "gradients", step=2)
    total = torch.stack([n.double() ** 2 for n in data.norms.values()]).sum(0).sqrt().numpy()
    assert logs[1]["grad_collection/total/norm_mean"] == pytest.approx(total.mean(), rel=1e-5)
    assert logs[1]["grad_collection/total/norm_std"] == pytest.approx(total.std(), rel=1e-4)


def test_stats_mode_writes_nothing_and_example_id_fallback(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "example_id"} for r in token_rows()]
    trainer = make_trainer(tmp_path, rows=rows, max_steps=1, gradient_collection_save="stats")
    trainer.train()
    assert not (tmp_path / "gradients").exists()
    trainer = make_trainer(tmp_path / "n", rows=rows, max_steps=1, gradient_collection_save="norms")
    trainer.train()
    ids = [s["example_id"] for s in load_gradients(tmp_path / "n" / "gradients").samples]
    assert ids == ["1:0:0", "1:0:1", "1:0:2", "1:0:3"]  # (step, microbatch, row)


def test_resume_gives_complete_duplicate_free_index(tmp_path, caplog):
    common = dict(save_strategy="steps", save_steps=2, gradient_collection_save="norms")
    first = make_trainer(tmp_path, max_steps=3, **common)
    first.train()  # steps 1..3 collected, checkpoint at step 2; pretend we crashed after step 3
    before = {(r["step"], r["sample"]): r["example_id"] for r in iter_index(tmp_path / "gradients")}
    second = make_trainer(tmp_path, max_steps=4, **common)
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    index = list(iter_index(tmp_path / "gradients"))
    keys = [(r["step"], r["sample"], r["layer"]) for r in index]
    assert len(keys) == len(set(keys)), "duplicated rows"
    layers = {r["layer"] for r in index}
    assert {r["step"] for r in index} == {1, 2, 3, 4}
    assert len(keys) == 4 * 4 * len(layers)  # steps x samples x layers: nothing missing
    after = {(r["step"], r["sample"]): r["example_id"] for r in index}
    assert all(after[k] == v for k, v in before.items())  # the redone step 3 saw the same data
    assert "no collected gradients on disk" not in caplog.text
    # A hole in the record is reported when resuming.
    first_shard = min(list_shards(tmp_path / "gradients"), key=lambda s: s.seq)
    first_shard.path.unlink()
    with caplog.at_level(logging.WARNING):
        make_trainer(tmp_path, max_steps=4, **common).train(
            resume_from_checkpoint=str(tmp_path / "checkpoint-4")
        )
    assert "no collected gradients on disk for steps [1]" in caplog.text


def test_shards_of_a_checkpointed_step_are_on_disk_when_the_checkpoint_is(tmp_path, monkeypatch):
    import time

    from transformers import TrainerCallback

    real = shards_mod.write_shard_atomic

    def slow(*args, **kwargs):
        time.sleep(0.05)  # a slow disk: without the flush at save time the queue would lag behind
        return real(*args, **kwargs)

    monkeypatch.setattr(shards_mod, "write_shard_atomic", slow)
    seen = {}

    class Spy(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            seen[state.global_step] = {r["step"] for r in iter_index(tmp_path / "gradients")}

    trainer = make_trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    trainer.add_callback(Spy())
    trainer.train()
    assert seen[1] >= {1} and seen[2] >= {1, 2}


def _fail_on_call(monkeypatch, n):
    real = shards_mod.write_safetensors
    calls = {"n": 0}

    def flaky(handle, tensors, metadata_for, checksums):
        calls["n"] += 1
        if calls["n"] >= n:
            handle.write(b"\x00" * 64)  # a partial file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(handle, tensors, metadata_for, checksums)

    monkeypatch.setattr(shards_mod, "write_safetensors", flaky)


def test_disk_full_raises_clear_error_and_keeps_complete_shards(tmp_path, monkeypatch):
    _fail_on_call(monkeypatch, 3)
    trainer = make_trainer(tmp_path, max_steps=4, gradient_collection_save="norms")
    with pytest.raises(StoreWriteError, match="gradient_collection_dir.*No space left"):
        trainer.train()
    directory = tmp_path / "gradients"
    assert len(list_shards(directory)) == 2
    assert not [p for p in directory.iterdir() if p.name.startswith(".")]  # no temp file left
    assert load_gradients(directory).steps == [1, 2]


def test_disk_full_with_warn_continues_training_without_collection(tmp_path, monkeypatch, caplog):
    _fail_on_call(monkeypatch, 2)
    trainer = make_trainer(
        tmp_path, max_steps=4, gradient_collection_save="norms", gradient_collection_on_error="warn"
    )
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert trainer.state.global_step == 4
    assert "gradient collection disabled" in caplog.text
    assert load_gradients(tmp_path / "gradients").steps == [1]
    logged = [h["step"] for h in trainer.state.log_history if "grad_collection/samples" in h]
    assert max(logged) <= 3  # no statistics once collection stopped


@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_unwritable_collection_dir(tmp_path, on_error):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    trainer = make_trainer(
        tmp_path, max_steps=2, gradient_collection_dir=str(blocker), gradient_collection_on_error=on_error
    )
    if on_error == "raise":
        with pytest.raises(UserFacingError, match="--gradient_collection_dir"):
            trainer.train()
        assert trainer.state.global_step == 0  # before the first step
    else:
        trainer.train()
        assert trainer.state.global_step == 2


def test_probe_file_mode(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "the", "cat", "sat", "on", "mat", "a", "dog"]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<pad>")
    probe = tmp_path / "probe.txt"
    probe.write_text("the cat sat on the mat\na dog sat\n\nthe dog\n")
    trainer = make_trainer(
        tmp_path,
        max_steps=2,
        gradient_collection_mode="separate",
        gradient_collection_probe_file=str(probe),
        gradient_collection_save="norms",
        gradient_collection_max_samples=2,
    )
    trainer.processing_class = tokenizer
    trainer.train()
    data = load_gradients(tmp_path / "gradients")
    assert data.steps == [1, 2]
    assert [s["example_id"] for s in data.samples] == [0, 1, 0, 1]
    # The probe is fixed, the parameters moved: gradients differ between steps.
    norms = next(iter(data.norms.values()))
    assert not torch.allclose(norms[:2], norms[2:])


def test_layers_matching_nothing_fail_when_the_trainer_is_built(tmp_path):
    with pytest.raises(
        UserFacingError, match="--gradient_collection_layers=nothing_like_this.*matches no module"
    ):
        make_trainer(tmp_path, gradient_collection_layers="nothing_like_this")


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--gradient_collection_max_samples", "0"], "--gradient_collection_max_samples=0"),
        (["--gradient_collection_steps", "0"], "--gradient_collection_steps=0"),
        (["--gradient_collection_memory_budget_mb", "0"], "--gradient_collection_memory_budget_mb"),
        (["--gradient_collection_chunk_size", "-1"], "--gradient_collection_chunk_size"),
        (
            [
                "--gradient_collection_mode",
                "separate",
                "--gradient_collection_probe_file",
                "/nonexistent.txt",
            ],
            "--gradient_collection_probe_file=/nonexistent.txt does not exist",
        ),
        (["--gradient_collection_probe_file", __file__], "needs --gradient_collection_mode separate"),
        (["--gradient_collection_method", "loop"], "loop needs --gradient_collection_mode separate"),
        (["--gradient_collection_layers", " "], "--gradient_collection_layers is empty"),
    ],
)
def test_bad_flags_fail_at_parse_time(tmp_path, flags, match):
    parser = HfArgumentParser(GradExtArguments)
    argv = ["--output_dir", str(tmp_path), "--collect_gradients", *flags]
    with pytest.raises(UserFacingError, match=match):
        parser.parse_args_into_dataclasses(argv)


def test_choices_are_enforced_by_the_parser(tmp_path, capsys):
    parser = HfArgumentParser(GradExtArguments)
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--gradient_collection_save", "all"]
        )
    assert "invalid choice" in capsys.readouterr().err


def test_flags_parse_and_default_dir(tmp_path):
    from hf_gradext.arguments.collection import resolve_collection_dir

    parser = HfArgumentParser(GradExtArguments)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--collect_gradients",
            "--gradient_collection_save",
            "full",
            "--gradient_collection_dtype",
            "bfloat16",
            "--gradient_collection_layers",
            "attn,h\\.0\\.mlp",
        ]
    )
    assert args.collect_gradients and args.gradient_collection_save == "full"
    assert resolve_collection_dir(args) == str(tmp_path / "gradients")
    args.gradient_collection_dir = "~/x"
    assert not resolve_collection_dir(args).startswith("~")


def test_no_callback_without_the_flag(tmp_path):
    from hf_gradext.callbacks.collection import PerSampleGradientCallback, _ObserverAdapter

    trainer = make_trainer(tmp_path, collect_gradients=False)
    assert not any(isinstance(cb, PerSampleGradientCallback) for cb in trainer.callback_handler.callbacks)
    assert not any(isinstance(o, _ObserverAdapter) for o in trainer._microbatch_observers)


@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_write_failure_surfacing_inside_the_backward_follows_on_error(tmp_path, on_error):
    from transformers import TrainerCallback

    from hf_gradext.callbacks.collection import PerSampleGradientCallback

    trainer = make_trainer(
        tmp_path,
        max_steps=3,
        gradient_accumulation_steps=2,
        gradient_collection_max_samples=8,
        gradient_collection_on_error=on_error,
    )
    (cb,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, PerSampleGradientCallback)]

    class BreakDisk(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                cb.sink.flush()
                cb.sink.writer._error = OSError(errno.ENOSPC, "No space left on device")

    trainer.add_callback(BreakDisk())
    # Step 2, microbatch 2: its first captured layer hands microbatch 1's shard to the (failed) writer
    # from inside the backward hook.
    if on_error == "raise":
        with pytest.raises(StoreWriteError, match="No space left"):
            trainer.train()
        assert trainer.state.global_step == 1
    else:
        trainer.train()
        assert trainer.state.global_step == 3 and not cb.enabled
    assert load_gradients(tmp_path / "gradients").steps == [1]


def test_stats_mode_never_reads_example_ids_from_the_device():
    from types import SimpleNamespace

    from hf_gradext.callbacks.collection import PerSampleGradientCallback

    inputs = {"example_id": torch.arange(2, device="meta")}  # any host read of a meta tensor raises
    stats = SimpleNamespace(save="stats", _step=3, _microbatch=1)
    assert PerSampleGradientCallback._ids(stats, inputs, 2) == ["3:1:0", "3:1:1"]
    on_disk = SimpleNamespace(save="norms", _step=3, _microbatch=1)
    assert PerSampleGradientCallback._ids(on_disk, {"example_id": torch.tensor([7, 9])}, 2) == [7, 9]
