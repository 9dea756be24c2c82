"""Checkpoints: damaged files refuse the resume in one line (``hf-gradext train`` exits 2 before loading
anything), a save on a full disk is one line, a resumed run never passes ``--max_steps``, and projection
index positions stay unique across a resume."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import TrainerCallback, default_data_collator

from hf_gradext.checkpoints import MANIFEST_FILE, verify_checkpoint
from hf_gradext.cli import main as cli_main
from hf_gradext.errors import UserFacingError
from hf_gradext.trainer import GradExtTrainer
from tests.faults._damage import (
    assert_cli_error,
    assert_one_line,
    flip_bit,
    flip_digit,
    safetensors_data_offset,
    truncate,
)
from tests.gqc._gqc_tiny import gqc_args, tiny_model, token_dataset


@pytest.fixture(scope="module")
def gqc_run(tmp_path_factory):
    """A --gqc run with checkpoint-1 and checkpoint-2 (model, optimizer, scheduler, RNG, GQC state)."""
    out = tmp_path_factory.mktemp("gqc_run") / "run"
    args = gqc_args(out, save_strategy="steps", save_steps=1, max_steps=2, gqc_threshold_start=1e9)
    GradExtTrainer(model=tiny_model(), args=args, train_dataset=token_dataset(16)).train()
    assert (out / "checkpoint-2" / MANIFEST_FILE).is_file() and (
        out / "checkpoint-2" / "gqc_state.json"
    ).is_file()
    return out


def _no_manifest(then):
    def damage(folder):
        (folder / MANIFEST_FILE).unlink()
        then(folder)

    return damage


def _file(name, how):
    return lambda folder: how(folder / name)


# case -> (damage of checkpoint-2, file the error must name, how it is detected)
CHECKPOINT_FAULTS = {
    "model_bit_flip": (_file("model.safetensors", lambda p: flip_bit(p, safetensors_data_offset(p) + 9, 6)), "model.safetensors", "checksum"),
    "model_truncated": (_file("model.safetensors", lambda p: truncate(p, 0.5)), "model.safetensors", "structure"),
    "optimizer_bit_flip": (_file("optimizer.pt", lambda p: flip_bit(p, -100, 3)), "optimizer.pt", "checksum"),
    "scheduler_truncated": (_file("scheduler.pt", lambda p: truncate(p, 0.5)), "scheduler.pt", "structure"),
    "rng_state_bit_flip": (_file("rng_state.pth", lambda p: flip_bit(p, 200, 1)), "rng_state.pth", "checksum"),
    "optimizer_missing": (_file("optimizer.pt", lambda p: p.unlink()), "optimizer.pt", "structure"),
    "gqc_state_truncated": (_file("gqc_state.json", lambda p: truncate(p, 0.5)), "gqc_state.json", "structure"),
    "gqc_state_digit_flip": (_file("gqc_state.json", lambda p: flip_digit(p, b'"microbatches": ')), "gqc_state.json", "checksum"),
    "trainer_state_digit_flip": (_file("trainer_state.json", lambda p: flip_digit(p, b'"global_step": ')), "trainer_state.json", "checksum"),
    "trainer_state_truncated": (_file("trainer_state.json", lambda p: truncate(p, 0.5)), "trainer_state.json", "structure"),
    "config_truncated": (_file("config.json", lambda p: truncate(p, 0.3)), "config.json", "structure"),
    "manifest_truncated": (_file(MANIFEST_FILE, lambda p: truncate(p, 0.5)), MANIFEST_FILE, "structure"),
    "plain_hf_model_truncated": (_no_manifest(_file("model.safetensors", lambda p: truncate(p, 0.5))), "model.safetensors", "structure"),
    "plain_hf_gqc_state_garbage": (_no_manifest(_file("gqc_state.json", lambda p: p.write_text("{]"))), "gqc_state.json", "structure"),
    "plain_hf_gqc_state_not_a_state": (_no_manifest(_file("gqc_state.json", lambda p: p.write_text('{"version": 1}'))), "gqc_state.json", "structure"),
    "gqc_state_missing": (_no_manifest(_file("gqc_state.json", lambda p: p.unlink())), "gqc_state.json", "structure"),
}  # fmt: skip


@pytest.mark.parametrize("how", ["path", "latest"])
@pytest.mark.parametrize("case", list(CHECKPOINT_FAULTS))
def test_damaged_checkpoint_refuses_the_resume_naming_the_file(gqc_run, tmp_path, capsys, case, how):
    damage, name, _ = CHECKPOINT_FAULTS[case]
    if how == "latest" and case == "trainer_state_truncated":
        pytest.skip("latest skips a checkpoint without a readable trainer_state.json (an interrupted save)")
    run = tmp_path / "run"
    shutil.copytree(gqc_run, run)
    damage(run / "checkpoint-2")
    resume = str(run / "checkpoint-2") if how == "path" else "latest"
    code = cli_main(["train", "--output_dir", str(run), "--resume_from_checkpoint", resume, "--gqc", "gnts"])
    line = assert_cli_error(code, capsys, name)
    assert "checkpoint" in line
    verify_checkpoint(run / "checkpoint-1", gqc=True)  # the checkpoint before is intact and trusted


def test_intact_checkpoints_verify(gqc_run):
    for step in (1, 2):
        verify_checkpoint(gqc_run / f"checkpoint-{step}", gqc=True)


def test_python_api_resume_verifies_too(gqc_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(gqc_run, run)
    flip_bit(run / "checkpoint-2" / "model.safetensors", -1, 4)
    args = gqc_args(run, max_steps=3, gqc_threshold_start=1e9)
    trainer = GradExtTrainer(model=tiny_model(), args=args, train_dataset=token_dataset(16))
    with pytest.raises(UserFacingError) as err:
        trainer.train(resume_from_checkpoint=str(run / "checkpoint-2"))
    assert_one_line(str(err.value), "model.safetensors", "checksum")


# ------------------------------------------------------------------------------------- disk full on save
def _torch_save_fails(real):
    def save(obj, f, *args, **kwargs):
        if "checkpoint-2" in str(f):
            raise RuntimeError(
                "[enforce fail at inline_container.cc:659] . unexpected pos 64 vs 0\n"
                "PytorchStreamWriter failed writing file data/0: file write failed"
            )
        return real(obj, f, *args, **kwargs)

    return save


def _safetensors_save_fails(real):
    from safetensors import SafetensorError

    def save(tensors, filename, *args, **kwargs):
        if "checkpoint-2" in str(filename):
            raise SafetensorError(
                'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
            )
        return real(tensors, filename, *args, **kwargs)

    return save


@pytest.mark.parametrize("what", ["optimizer_torch_save", "model_safetensors"])
def test_checkpoint_save_on_a_full_disk_is_one_line(tmp_path, monkeypatch, what):
    if what == "optimizer_torch_save":
        monkeypatch.setattr(torch, "save", _torch_save_fails(torch.save))
    else:
        import transformers.modeling_utils as mu

        monkeypatch.setattr(mu, "safe_save_file", _safetensors_save_fails(mu.safe_save_file))
    out = tmp_path / "run"
    args = gqc_args(out, gqc="none", save_strategy="steps", save_steps=1, max_steps=3)
    trainer = GradExtTrainer(model=tiny_model(), args=args, train_dataset=token_dataset(16))
    with pytest.raises(UserFacingError) as err:
        trainer.train()
    assert_one_line(str(err.value), "--output_dir", "checkpoint-2", "earlier checkpoints are intact")
    assert not (out / "checkpoint-2").exists()  # the half-written folder does not hold the space
    verify_checkpoint(out / "checkpoint-1")


# ---------------------------------------------------------------------------------------------- max_steps
class _CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_begin(self, args, state, control, **kwargs):
        self.steps += 1


@pytest.mark.parametrize("max_steps", [3, 2])
def test_resumed_finished_run_takes_no_step_past_max_steps(tmp_path, max_steps):
    """checkpoint-3 of a run with --max_steps 3 (mid-epoch: 4 steps per epoch); resumed with --max_steps 3
    (or 2: the checkpoint is past it already), HF's loop alone takes a 4th step."""
    out = tmp_path / "run"
    args = gqc_args(out, gqc="none", save_strategy="steps", save_steps=3, max_steps=3)
    GradExtTrainer(model=tiny_model(), args=args, train_dataset=token_dataset(16)).train()
    counter = _CountSteps()
    args = gqc_args(out, gqc="none", save_strategy="steps", save_steps=3, max_steps=max_steps)
    trainer = GradExtTrainer(
        model=tiny_model(), args=args, train_dataset=token_dataset(16), callbacks=[counter]
    )
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    assert counter.steps == 0 and trainer.state.global_step == 3


# ------------------------------------------------------------------------------ projection index positions
def _positions(directory):
    from hf_gradext.store import list_shards, read_shard_header

    return sorted(
        (r["step"], r["example_id"], r["position"])
        for s in list_shards(directory, "proj")
        for r in read_shard_header(s.path)[0]
    )


def test_resume_keeps_projection_positions_unique(tmp_path):
    from tests.callbacks.test_projection import _args, _BlocksWithIds
    from tests.projection.conftest import make_tiny_gpt2

    data = _BlocksWithIds(n=16)

    def run(out, resume=None):
        args = _args(
            tmp_path,
            output_dir=str(tmp_path / out),
            max_steps=4,
            save_strategy="steps",
            save_steps=2,
            proj_save_interval=1,
        )
        trainer = GradExtTrainer(
            model=make_tiny_gpt2(dtype=torch.float32),
            args=args,
            train_dataset=data,
            data_collator=default_data_collator,
        )
        trainer.train(resume_from_checkpoint=resume)

    run("full")
    run("cut")
    run("cut", resume=str(tmp_path / "cut" / "checkpoint-2"))
    full, resumed = (
        _positions(tmp_path / "full" / "projections"),
        _positions(tmp_path / "cut" / "projections"),
    )
    positions = [p for _, _, p in resumed]
    assert len(set(positions)) == len(positions) == 16  # before: 8 duplicates (restarted at 0)
    assert resumed == full  # the same positions an uninterrupted run gives
