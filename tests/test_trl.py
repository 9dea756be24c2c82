"""hf_gradext inside TRL's ``SFTTrainer`` (``GradExtSFTTrainer`` + ``GradExtSFTConfig``), on real trl.

Every run trains a tiny GPT-2 (2 layers, d=32, the embedded-corpus tokenizer) for a few steps on a
plain-text SFT dataset (a ``text`` column, no ``example_id``), fp32 on the CPU, with the sequential
sampler so that the k-th sample the trainer sees is row k of the dataset. What each test compares:

* ids: collected and projected example ids == the dataset row indices of the samples of each batch;
* gradients: per-sample gradients collected from the SFT training backward == a float64 loop over the
  same rows (each row's own mean token loss, one ``backward`` per row) on the initial weights;
  projected rows == a standalone projection of the same rows at the initial weights;
* GQC: a ``--gqc gnts`` SFT run == a ``GradExtTrainer`` run on the very rows TRL tokenized (same
  decisions, tested norms and final weights, up to the fused LM head's float rounding);
* tensorboard: the event file of a ``report_to="tensorboard"`` run holds ``gqc/*`` and
  ``grad_collection/*`` scalars;
* refusals (packing, padding-free, LM head under the fused head, GradExtArguments) are one-line
  ``UserFacingError``\\ s naming the fix, and TRL drifts are ``IntegrationError``\\ s naming the touchpoint.
"""

from __future__ import annotations

import functools
import glob
import subprocess
import sys

import pytest
import torch

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import GPT2Model, HfArgumentParser  # noqa: E402
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling, SFTTrainer  # noqa: E402

from hf_gradext.analysis import load_gradients  # noqa: E402
from hf_gradext.arguments import GradExtArguments  # noqa: E402
from hf_gradext.arguments.sft import GradExtSFTConfig  # noqa: E402
from hf_gradext.errors import UserFacingError  # noqa: E402
from hf_gradext.grad import SparseRowGrad  # noqa: E402
from hf_gradext.integrations import guard  # noqa: E402
from hf_gradext.integrations import trl as trl_integration  # noqa: E402
from hf_gradext.projection import KroneckerProjector  # noqa: E402
from hf_gradext.projection.io import load_projections  # noqa: E402
from hf_gradext.trainer import GradExtSFTTrainer, GradExtTrainer  # noqa: E402
from tests.helpers import REPO_ROOT, make_tiny_gpt2  # noqa: E402
from tests.integrations.drift import assert_drift  # noqa: E402

BATCH = 4
# Different lengths, so every batch is padded (padding must contribute nothing).
TEXTS = [f"sample number {i} says " + "hello world " * (i % 5 + 1) for i in range(24)]
CPU = {"use_cpu": True, "bf16": False}  # TRL defaults to bf16, which needs use_cpu off a GPU


@pytest.fixture(autouse=True)
def _fresh_checks():
    guard.reset_checks()
    yield
    guard.reset_checks()


@pytest.fixture
def forward_spy(monkeypatch):
    """Keyword names of every GPT-2 backbone forward (TRL's fused head calls the backbone directly)."""
    calls: list[tuple[str, ...]] = []
    original = GPT2Model.forward

    @functools.wraps(original)
    def spy(self, *args, **kwargs):
        calls.append(tuple(sorted(kwargs)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GPT2Model, "forward", spy)
    return calls


def _model(tokenizer, **overrides):
    return make_tiny_gpt2(
        vocab_size=len(tokenizer),
        n_positions=64,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )


def _config(out, **flags) -> GradExtSFTConfig:
    base = dict(
        output_dir=str(out), per_device_train_batch_size=BATCH, max_length=32, bf16=False,
        gradient_checkpointing=False, use_cpu=True, report_to=[], logging_steps=1, save_strategy="no",
        disable_tqdm=True, train_sampling_strategy="sequential", seed=0, dataloader_pin_memory=False,
    )  # fmt: skip
    base.update(flags)
    return GradExtSFTConfig(**base)


def _trainer(tokenizer, args, model=None, texts=TEXTS, **kwargs) -> GradExtSFTTrainer:
    return GradExtSFTTrainer(
        model=model if model is not None else _model(tokenizer),
        args=args,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        **kwargs,
    )


def _dense(x):
    return x.to_dense() if isinstance(x, SparseRowGrad) else x


def _loop_oracle(model, rows) -> dict[str, torch.Tensor]:
    """float64 per-sample gradients: one forward/backward per row, of that row's own mean token loss."""
    model = model.double().eval()
    params = dict(model.named_parameters())
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in params}
    for row in rows:
        model.zero_grad(set_to_none=True)
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
        model(input_ids=ids, labels=labels).loss.backward()  # HF's shifted token mean over this row
        for name, p in params.items():
            grads[name].append(p.grad.clone() if p.grad is not None else torch.zeros_like(p))
    return {name: torch.stack(g) for name, g in grads.items()}


def _row_of(prepared, example_id: int) -> dict:
    row = prepared[example_id]
    assert row["example_id"] == example_id  # no row dropped: the prepared row k is dataset row k
    return row


# ---------------------------------------------------------------------------------- imports and config
def test_importing_hf_gradext_and_its_trainer_does_not_import_trl():
    code = "import sys, hf_gradext, hf_gradext.trainer; assert 'trl' not in sys.modules, 'trl imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, timeout=120)


def test_config_carries_the_feature_flags_and_validates_like_gradext_arguments(tmp_path):
    parser = HfArgumentParser(GradExtSFTConfig)  # no field clashes with SFTConfig
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--gqc", "gnts", "--collect_gradients", "--max_length", "16",
         "--use_cpu", "--bf16", "false"]
    )  # fmt: skip
    assert args.gqc == "gnts" and args.collect_gradients and args.max_length == 16
    assert isinstance(args, trl.SFTConfig)
    for bad, fragment in (
        ({"gqc": "bogus"}, "--gqc 'bogus' is unknown"),
        ({"gqc": "gnts", "gradient_accumulation_steps": 2}, "--gradient_accumulation_steps 2 conflicts"),
        ({"gradient_collection_steps": 0}, "--gradient_collection_steps=0"),
        ({"proj_rank_total": 4, "proj_rank_min": 8}, "--proj_rank_total=4"),
        ({"swiglu_hidden_size": 8}, "--swiglu_hidden_size only applies"),
        ({"max_steps": -3}, "--max_steps -3 is out of range"),
    ):
        with pytest.raises(UserFacingError, match=fragment.replace("(", r"\(")):
            GradExtSFTConfig(output_dir=str(tmp_path), **CPU, **bad)


@pytest.mark.parametrize("flag", ["collect_gradients", "project_gradients"])
@pytest.mark.parametrize("rows", [{"packing": True}, {"padding_free": True}])
def test_packed_rows_are_refused_with_a_per_sample_consumer(tmp_path, flag, rows):
    with pytest.raises(UserFacingError) as info:
        GradExtSFTConfig(output_dir=str(tmp_path), max_length=16, **CPU, **{flag: True}, **rows)
    message = str(info.value)
    assert "\n" not in message and f"--{flag}" in message
    assert f"{next(iter(rows))}=False" in message
    GradExtSFTConfig(
        output_dir=str(tmp_path), max_length=16, gqc="gnts", **CPU, **rows
    )  # GQC alone packs fine


def test_packing_switched_on_after_the_config_is_refused_by_the_trainer(tmp_path, tiny_tokenizer):
    args = _config(tmp_path, project_gradients=True)
    args.packing = True
    with pytest.raises(UserFacingError, match="set packing=False"):
        _trainer(tiny_tokenizer, args)


def test_gradext_arguments_are_refused_because_sft_trainer_would_drop_their_flags(tmp_path, tiny_tokenizer):
    args = GradExtArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(UserFacingError, match="pass hf_gradext.arguments.sft.GradExtSFTConfig"):
        _trainer(tiny_tokenizer, args)


# ---------------------------------------------------------------------------------- example ids and oracles
def test_ids_and_per_sample_gradients_of_an_sft_run_match_a_float64_loop_oracle(
    tmp_path, tiny_tokenizer, forward_spy
):
    args = _config(
        tmp_path, max_steps=2,
        collect_gradients=True, gradient_collection_steps=1, gradient_collection_save="full",
        gradient_collection_layers="attn,mlp,norm,embed",  # untied: every layer but the fused lm_head
        project_gradients=True, proj_dtype="float32",
    )  # fmt: skip
    trainer = _trainer(tiny_tokenizer, args, model=_model(tiny_tokenizer, tie=False))
    prepared = trainer.train_dataset
    assert "example_id" in prepared.column_names  # added before TRL tokenized, kept through it
    trainer.train()
    assert forward_spy and not [keys for keys in forward_spy if "example_id" in keys]

    collected = load_gradients(tmp_path / "gradients")
    assert [s["example_id"] for s in collected.samples] == list(range(2 * BATCH))  # dataset rows, in order
    assert [s["step"] for s in collected.samples] == [1] * BATCH + [2] * BATCH
    rows, projected_ids, meta = load_projections(tmp_path / "projections", sort_by_id=False)
    assert projected_ids == list(range(2 * BATCH))  # not -1: attribution can name the examples

    # Step 1 ran at the initial weights: the oracle sees the same rows as TRL prepared them.
    step1 = [_row_of(prepared, i) for i in range(BATCH)]
    oracle = _loop_oracle(_model(tiny_tokenizer, tie=False), step1)
    assert set(collected.grads) == set(oracle) - {"lm_head.weight"}
    for name, got in collected.grads.items():
        torch.testing.assert_close(_dense(got)[:BATCH].double(), oracle[name], rtol=1e-4, atol=1e-6, msg=name)

    collator = DataCollatorForLanguageModeling(pad_token_id=tiny_tokenizer.pad_token_id)
    batch = collator([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in step1])
    expected = KroneckerProjector.from_metadata(meta, _model(tiny_tokenizer, tie=False)).project(batch)
    got = rows[:BATCH].float()
    assert float((got - expected).norm(dim=1).max() / expected.norm(dim=1).mean()) < 1e-4


def test_ids_name_the_users_rows_when_trl_drops_some_with_lora_and_checkpointing(tmp_path, tiny_tokenizer):
    peft = pytest.importorskip("peft")
    # Prompt-completion: completion-only loss; a completion truncated away leaves a fully masked row,
    # which TRL drops after tokenizing. Ids must still be the rows of the dataset passed in.
    prompts = [f"sample {i} " + "long " * (12 if i % 3 == 2 else 1) for i in range(12)]
    dataset = Dataset.from_dict({"prompt": prompts, "completion": [" ok"] * 12})
    args = _config(
        tmp_path, max_steps=2, max_length=16, project_gradients=True, proj_dtype="float32",
        gradient_checkpointing=True,  # TRL's default
    )  # fmt: skip
    trainer = GradExtSFTTrainer(
        model=_model(tiny_tokenizer),
        args=args,
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
        peft_config=peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True),
    )
    kept = trainer.train_dataset["example_id"]
    assert kept == [i for i in range(12) if i % 3 != 2]  # TRL dropped rows 2, 5, 8, 11
    trainer.train()
    rows, ids, meta = load_projections(tmp_path / "projections", sort_by_id=False)
    assert ids == kept[: 2 * BATCH]
    assert all(".lora_" in layer["name"] for layer in meta["layers"])  # peft: the adapters are projected


def test_a_dataset_with_its_own_example_ids_keeps_them(tmp_path, tiny_tokenizer):
    dataset = Dataset.from_dict({"text": TEXTS[:8], "example_id": list(range(100, 108))})
    args = _config(tmp_path, max_steps=1, project_gradients=True, proj_dtype="float32")
    GradExtSFTTrainer(
        model=_model(tiny_tokenizer), args=args, train_dataset=dataset, processing_class=tiny_tokenizer
    ).train()
    _, ids, _ = load_projections(tmp_path / "projections", sort_by_id=False)
    assert ids == [100, 101, 102, 103]


def test_example_ids_of_an_iterable_dataset_are_its_stream_positions():
    stream = Dataset.from_dict({"text": TEXTS[:5]}).to_iterable_dataset()
    assert [row["example_id"] for row in trl_integration.with_example_ids(stream)] == list(range(5))


def test_example_id_collator_keeps_what_trls_collator_drops():
    features = [{"input_ids": [1, 2, 3], "example_id": 7}, {"input_ids": [4, 5], "example_id": 9}]
    inner = DataCollatorForLanguageModeling(pad_token_id=0)
    assert "example_id" not in inner(features)  # why the wrapper exists
    batch = trl_integration.ExampleIdCollator(inner)(features)
    assert batch["example_id"].tolist() == [7, 9]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, 5, -100]]


# ---------------------------------------------------------------------------------- the fused LM head
def test_lm_head_under_trls_fused_head_is_refused_and_no_hook_is_left(tmp_path, tiny_tokenizer):
    model = _model(tiny_tokenizer)  # tied: wte is the lm_head's weight
    args = _config(tmp_path, collect_gradients=True)  # default selection: all
    with pytest.raises(UserFacingError) as info:
        _trainer(tiny_tokenizer, args, model=model)
    message = str(info.value)
    assert "\n" not in message and "--gradient_collection_layers" in message
    assert "lm_head" in message and "transformer.wte" in message and "attn,mlp,norm" in message
    assert not [n for n, m in model.named_modules() if m._forward_hooks]

    args = _config(tmp_path, project_gradients=True, include_embeddings=True)
    with pytest.raises(UserFacingError, match="--proj_layers selects transformer.wte"):
        _trainer(tiny_tokenizer, args)


def test_separate_mode_collection_calls_the_lm_head_and_may_select_it(tmp_path, tiny_tokenizer):
    args = _config(
        tmp_path, max_steps=1, collect_gradients=True, gradient_collection_mode="separate",
        gradient_collection_steps=1,
    )  # fmt: skip
    trainer = _trainer(tiny_tokenizer, args)
    trainer.train()
    assert any("grad_collection/total/norm_mean" in h for h in trainer.state.log_history)


# ---------------------------------------------------------------------------------- GQC
def test_gqc_under_sft_decides_as_gradext_trainer_on_the_same_tokenized_rows(tmp_path, tiny_tokenizer):
    common = dict(
        per_device_train_batch_size=2, num_train_epochs=1, learning_rate=1e-2, lr_scheduler_type="constant",
        gqc="gnts", gqc_threshold_start=2.0, gqc_max_microbatches=4,
        use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True,
        train_sampling_strategy="sequential", seed=0, gradient_checkpointing=False,
        dataloader_pin_memory=False,
    )  # fmt: skip
    sft = _trainer(
        tiny_tokenizer,
        GradExtSFTConfig(output_dir=str(tmp_path / "sft"), bf16=False, max_length=32, **common),
    )
    before = [p.detach().clone() for p in sft.model.parameters()]
    sft.train()  # GradExtTrainer.training_step checks every microbatch runs inside the GQC loop
    plain = GradExtTrainer(
        model=_model(tiny_tokenizer),
        args=GradExtArguments(output_dir=str(tmp_path / "plain"), **common),
        train_dataset=sft.train_dataset,  # the rows TRL tokenized
        data_collator=DataCollatorForLanguageModeling(pad_token_id=tiny_tokenizer.pad_token_id),
    )
    plain.train()

    def decisions(trainer):
        logs = [h for h in trainer.state.log_history if "gqc/microbatches" in h]
        return [h["gqc/microbatches"] for h in logs], [h["gqc/grad_norm"] for h in logs]

    (k_sft, norm_sft), (k_plain, norm_plain) = decisions(sft), decisions(plain)
    assert k_sft == k_plain and len(set(k_sft)) > 1  # the controller really chose different windows
    assert sum(k_sft) == len(TEXTS) // 2  # one epoch of microbatches
    torch.testing.assert_close(torch.tensor(norm_sft), torch.tensor(norm_plain), rtol=1e-4, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(before, sft.model.parameters()))
    for a, b in zip(sft.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-4)  # fused log-softmax vs HF's cross-entropy


def test_tensorboard_event_file_holds_gqc_and_collection_scalars(tmp_path, tiny_tokenizer):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = _config(
        tmp_path, num_train_epochs=1, per_device_train_batch_size=2, report_to=["tensorboard"],
        gqc="gnts", gqc_threshold_start=2.0, gqc_max_microbatches=4,
        collect_gradients=True, gradient_collection_steps=1, gradient_collection_layers="attn,mlp",
    )  # fmt: skip
    _trainer(tiny_tokenizer, args, texts=TEXTS[:12]).train()
    (event_file,) = glob.glob(str(tmp_path / "runs" / "*" / "events.out.tfevents.*"))
    tags = EventAccumulator(event_file).Reload().Tags()["scalars"]
    assert "train/gqc/microbatches" in tags and "train/gqc/grad_norm" in tags, tags
    assert "train/grad_collection/total/norm_mean" in tags, tags
    assert "train/loss" in tags and "train/mean_token_accuracy" in tags  # HF's and TRL's own keys stay


# ---------------------------------------------------------------------------------- TRL drift
def test_every_trl_check_passes_on_the_installed_trl():
    trl_integration.check_all()


def test_compute_loss_without_the_fused_keyword_is_drift(monkeypatch):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return model(**inputs).loss

    monkeypatch.setattr(SFTTrainer, "compute_loss", compute_loss)
    assert_drift(
        "trl", lambda: trl_integration.lm_head_bypassed(make_tiny_gpt2()), trl_integration.FUSED_LM_HEAD
    )


def test_preparation_that_drops_extra_columns_is_drift(monkeypatch, tmp_path, tiny_tokenizer):
    original = SFTTrainer._prepare_dataset

    def prepare(self, dataset, *args, **kwargs):
        return original(self, dataset, *args, **kwargs).select_columns(["input_ids", "labels"])

    monkeypatch.setattr(SFTTrainer, "_prepare_dataset", prepare)
    args = _config(tmp_path, project_gradients=True)
    assert_drift(
        "trl", lambda: _trainer(tiny_tokenizer, args), trl_integration.PREPARED_COLUMNS, "example_id"
    )
