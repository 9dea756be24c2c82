"""Features composed in one real ``hf-gradext train`` run on the embedded default (tiny, few steps).

Every run here:

* records the keyword arguments of every ``GPT2LMHeadModel.forward`` call (training and the final
  evaluation) and asserts the model never receives ``example_id``;
* uses the sequential sampler where the test needs to know which block a row came from, so stored
  example ids can be compared with the dataset's ``example_id`` column, and rows/gradients of the
  first optimizer step with an oracle computed on the run's initial model (rebuilt from the same flags
  and seed: parse -> set_seed -> tokenizer -> config -> model, as ``hf_gradext.train.run`` does).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel, Trainer, TrainingArguments, default_data_collator

from hf_gradext.analysis import load_gradients
from hf_gradext.grad import SparseRowGrad, per_sample_gradients
from hf_gradext.projection import KroneckerProjector
from hf_gradext.projection.io import PREFIX as PROJ_PREFIX
from hf_gradext.projection.io import list_shards, load_projections, read_shard_header
from hf_gradext.train import main

BATCH = 4
TINY = [
    "--config_overrides", "n_layer=2,n_embd=32,n_head=2,resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0",
    "--block_size", "32",
    "--max_train_samples", "48",
    "--max_eval_samples", "8",
    "--per_device_train_batch_size", str(BATCH),
    "--per_device_eval_batch_size", "4",
    "--logging_steps", "1",
    "--save_strategy", "no",
    "--eval_strategy", "no",
    "--disable_tqdm", "true",
    "--dataloader_pin_memory", "false",
    "--report_to", "none",
    "--log_level", "warning",
]  # fmt: skip
SEQUENTIAL = ["--train_sampling_strategy", "sequential"]
PROJECT = ["--project_gradients", "--proj_dtype", "float32"]  # fp32 storage: exact oracle comparisons
COLLECT_FULL = [
    "--collect_gradients", "--gradient_collection_steps", "1", "--gradient_collection_save", "full",
]  # fmt: skip


@pytest.fixture
def forward_spy(monkeypatch):
    """Records ``(training, sorted kwarg names)`` of every GPT-2 forward (peft and patches call it too)."""
    calls: list[tuple[bool, tuple[str, ...]]] = []
    original = GPT2LMHeadModel.forward

    @functools.wraps(original)  # keeps the signature HF reads for remove_unused_columns
    def spy(self, *args, **kwargs):
        calls.append((self.training, tuple(sorted(kwargs))))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GPT2LMHeadModel, "forward", spy)
    return calls


def _train(out: Path, *flags: str) -> list[str]:
    argv = ["--output_dir", str(out), *TINY, *flags]
    assert main(argv) == 0
    return argv


def _assert_no_example_id_in_forward(calls, with_eval: bool = True) -> None:
    assert any(training for training, _ in calls)
    if with_eval:  # train.py evaluates after training: prediction_step must strip it too
        assert any(not training for training, _ in calls)
    leaked = [keys for _, keys in calls if "example_id" in keys]
    assert not leaked, leaked


def _initial(argv: list[str]):
    """The run's initial model and train blocks, rebuilt exactly as ``hf_gradext.train.run`` does."""
    from transformers import set_seed

    from hf_gradext.arguments.parsing import parse_args
    from hf_gradext.data import build_datasets, load_tokenizer
    from hf_gradext.models import build_config, load_model, resolve_block_size

    args = parse_args(argv)
    set_seed(args.seed)
    tokenizer = load_tokenizer(args)
    config = build_config(args, tokenizer)
    train, _ = build_datasets(args, tokenizer, block_size=resolve_block_size(args, tokenizer, config))
    return load_model(args, tokenizer, config).eval(), train


def _batch(blocks, ids: list[int]) -> dict[str, torch.Tensor]:
    rows = blocks.select(ids)
    return {k: torch.as_tensor(rows[k]) for k in ("input_ids", "labels")}


def _projection_index(directory: Path) -> list[dict]:
    return [r for info in list_shards(directory, PROJ_PREFIX) for r in read_shard_header(info.path)[0]]


def _dense(x):
    return x.to_dense() if isinstance(x, SparseRowGrad) else x


def _assert_grads_equal_oracle(collected, model, blocks, step: int) -> None:
    """Collected gradients of ``step`` == per-sample gradients of the initial model (step 1 only)."""
    samples = [s for s in collected.samples if s["step"] == step]
    rows = [j for j, s in enumerate(collected.samples) if s["step"] == step]
    ref = per_sample_gradients(model, _batch(blocks, [int(s["example_id"]) for s in samples]))
    assert set(collected.grads) == set(ref)
    for name, value in ref.items():
        got = _dense(collected.grads[name])[rows[0] : rows[-1] + 1]
        torch.testing.assert_close(got, _dense(value), rtol=1e-4, atol=1e-6, msg=name)


def _assert_rows_equal_projection(directory: Path, model, blocks, step: int) -> None:
    """Stored rows of ``step`` (the optimizer step the microbatch feeds into) at the initial weights
    == a standalone projection of the same blocks."""
    rows, ids, meta = load_projections(directory, sort_by_id=False)
    index = _projection_index(directory)
    pick = [j for j, r in enumerate(index) if r["step"] == step]
    projector = KroneckerProjector.from_metadata(meta, model)
    expected = projector.project(_batch(blocks, [ids[j] for j in pick]))
    got = rows[pick].float()
    scale = expected.norm(dim=1).mean()
    assert float((got - expected).norm(dim=1).max() / scale) < 1e-4


# ---------------------------------------------------------------------------------- example_id plumbing
def test_projection_only_stores_real_example_ids_and_model_never_sees_them(tmp_path, forward_spy):
    out = tmp_path / "proj"
    argv = _train(out, "--max_steps", "3", *PROJECT, *SEQUENTIAL)
    _assert_no_example_id_in_forward(forward_spy)
    rows, ids, _ = load_projections(out / "projections", sort_by_id=False)
    assert ids == list(range(3 * BATCH))  # sequential sampler: blocks 0..11, no -1
    assert [r["step"] for r in _projection_index(out / "projections")] == [
        s for s in range(1, 4) for _ in range(BATCH)
    ]
    model, blocks = _initial(argv)
    assert blocks["example_id"][: 3 * BATCH] == ids
    _assert_rows_equal_projection(out / "projections", model, blocks, step=1)


def test_collection_full_stores_real_example_ids_with_the_random_sampler(tmp_path, forward_spy):
    out = tmp_path / "collect"
    argv = _train(out, "--max_steps", "2", *COLLECT_FULL)
    _assert_no_example_id_in_forward(forward_spy)
    data = load_gradients(out / "gradients")
    ids = [s["example_id"] for s in data.samples]
    model, blocks = _initial(argv)
    assert data.steps == [1, 2] and len(ids) == 2 * BATCH == len(set(ids))
    assert set(ids) <= set(blocks["example_id"])  # real dataset ids (ints), never a fallback string
    _assert_grads_equal_oracle(data, model, blocks, step=1)


def test_example_id_is_stripped_even_without_remove_unused_columns(tmp_path, forward_spy):
    """With ``remove_unused_columns=False`` the column reaches the batch in any case; it must not reach
    the model (training or evaluation), with or without a per-sample consumer."""
    from datasets import Dataset

    from hf_gradext import GradExtArguments, GradExtTrainer

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (8, 16), generator=g)
    data = Dataset.from_dict(
        {"input_ids": ids.tolist(), "labels": ids.tolist(), "example_id": list(range(8))}
    )
    from tests.helpers import make_tiny_gpt2

    args = GradExtArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        remove_unused_columns=False,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    trainer = GradExtTrainer(
        model=make_tiny_gpt2(vocab_size=50), args=args, train_dataset=data, eval_dataset=data,
        data_collator=default_data_collator,
    )  # fmt: skip
    trainer.train()
    trainer.evaluate()
    trainer.predict(data.remove_columns("labels"))  # prediction_step without labels: a plain forward
    _assert_no_example_id_in_forward(forward_spy)


# ---------------------------------------------------------------------------------- feature combinations
def test_gqc_with_collection_and_projection(tmp_path, forward_spy):
    """GNTS with threshold 0 never passes: every window is capped at 3 microbatches, so each optimizer
    step has 3 x BATCH rows, all taken at the same weights and indexed with that step."""
    out = tmp_path / "gqc"
    gqc = ["--gqc", "gnts", "--gqc_threshold_start", "0", "--gqc_max_microbatches", "3"]
    collect = [
        "--collect_gradients", "--gradient_collection_steps", "1",
        "--gradient_collection_max_samples", "64", "--gradient_collection_save", "full",
    ]  # fmt: skip
    argv = _train(out, "--max_steps", "2", *gqc, *collect, *PROJECT, *SEQUENTIAL)
    _assert_no_example_id_in_forward(forward_spy)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert [h["gqc/total_microbatches"] for h in state["log_history"] if "gqc/total_microbatches" in h][
        -1
    ] == 6
    window = 3 * BATCH
    # collection: step s = the s-th optimizer step; all microbatches of its window are there
    data = load_gradients(out / "gradients")
    assert data.steps == [1, 2]
    assert [(s["step"], s["example_id"]) for s in data.samples] == [
        (1 + i // window, i) for i in range(2 * window)
    ]
    # projection: the same step convention
    index = _projection_index(out / "projections")
    assert [(r["step"], r["example_id"]) for r in index] == [(1 + i // window, i) for i in range(2 * window)]
    model, blocks = _initial(argv)
    _assert_grads_equal_oracle(data, model, blocks, step=1)
    _assert_rows_equal_projection(out / "projections", model, blocks, step=1)


def test_rmsnorm_swiglu_with_collection_and_projection(tmp_path, forward_spy):
    out = tmp_path / "patched"
    argv = _train(
        out,
        "--max_steps",
        "2",
        "--gpt2_rms_norm",
        "--gpt2_swiglu",
        *COLLECT_FULL,
        *PROJECT,
        *SEQUENTIAL,
    )
    _assert_no_example_id_in_forward(forward_spy)
    data = load_gradients(out / "gradients")
    assert any("gate_proj" in n for n in data.grads) and not any(n.endswith("ln_1.bias") for n in data.grads)
    assert [s["example_id"] for s in data.samples] == list(range(2 * BATCH))
    model, blocks = _initial(argv)
    assert type(model.transformer.h[0].ln_1).__name__ == "GradExtRMSNorm"
    _assert_grads_equal_oracle(data, model, blocks, step=1)
    _, ids, meta = load_projections(out / "projections", sort_by_id=False)
    assert ids == list(range(2 * BATCH)) and any("gate_proj" in b["name"] for b in meta["layers"])
    _assert_rows_equal_projection(out / "projections", model, blocks, step=1)
    # The saved model is the patched architecture under its own model_type, and reloads as such.
    from transformers import AutoModelForCausalLM

    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2_gradext"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded).__name__ == "GradExtGPT2LMHeadModel"
    assert type(reloaded.transformer.h[0].mlp).__name__ == "GradExtSwiGLUMLP"


def test_lora_with_projection_defaults_to_the_lora_layers(tmp_path, forward_spy):
    out = tmp_path / "lora"
    argv = _train(
        out, "--max_steps", "2", "--use_peft", "--lora_r", "4", "--lora_dropout", "0", *PROJECT, *SEQUENTIAL
    )
    _assert_no_example_id_in_forward(forward_spy)
    assert (out / "adapter_model.safetensors").is_file()
    rows, ids, meta = load_projections(out / "projections", sort_by_id=False)
    assert ids == list(range(2 * BATCH)) and rows.shape[0] == 2 * BATCH
    assert meta["proj_layers"] == "lora" and all("lora_" in b["name"] for b in meta["layers"])
    model, blocks = _initial(argv)
    _assert_rows_equal_projection(out / "projections", model, blocks, step=1)


def test_activation_checkpointing_with_collection(tmp_path, forward_spy):
    out = tmp_path / "ckpt"
    argv = _train(out, "--max_steps", "2", "--activation_checkpointing", "true", *COLLECT_FULL, *SEQUENTIAL)
    _assert_no_example_id_in_forward(forward_spy)
    data = load_gradients(out / "gradients")
    assert data.steps == [1, 2] and [s["example_id"] for s in data.samples] == list(range(2 * BATCH))
    model, blocks = _initial(argv)
    _assert_grads_equal_oracle(data, model, blocks, step=1)  # recomputation neither doubles nor drops


# ---------------------------------------------------------------------------------- no attention_mask
def test_blocks_without_attention_mask_train_identically(tmp_path):
    """The grouped blocks carry no attention_mask; an all-ones mask would change nothing but a host sync."""
    from hf_gradext.arguments.parsing import parse_args
    from hf_gradext.data import build_datasets, load_tokenizer
    from tests.helpers import make_tiny_gpt2

    args = parse_args(["--output_dir", str(tmp_path), *TINY])
    tokenizer = load_tokenizer(args)
    blocks, eval_blocks = build_datasets(args, tokenizer, block_size=32)
    assert "attention_mask" not in blocks.column_names and "attention_mask" not in eval_blocks.column_names
    with_mask = blocks.add_column("attention_mask", [[1] * 32] * len(blocks))
    finals = []
    for data in (blocks, with_mask):
        targs = TrainingArguments(
            output_dir=str(tmp_path / str(len(finals))), max_steps=3, per_device_train_batch_size=4,
            report_to=[], save_strategy="no", use_cpu=True, seed=0, logging_steps=1,
            train_sampling_strategy="sequential",
        )  # fmt: skip
        model = make_tiny_gpt2(vocab_size=len(tokenizer), n_positions=32, attn_implementation="sdpa")
        trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=default_data_collator)
        trainer.train()
        finals.append((model.state_dict(), [h["loss"] for h in trainer.state.log_history if "loss" in h]))
    (a, la), (b, lb) = finals
    assert la == pytest.approx(lb, rel=1e-6)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
