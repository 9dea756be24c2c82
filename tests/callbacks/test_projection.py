import json

import pytest
import torch
from transformers import default_data_collator

from hf_gradext.arguments import GradExtArguments
from hf_gradext.projection import KroneckerProjector, load_projections
from hf_gradext.trainer import GradExtTrainer
from tests.projection.conftest import make_tiny_gpt2


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=6, vocab=61, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        project_gradients=True,
        proj_rank_total=16,
        proj_rank_min=2,
        proj_dtype="float32",
        proj_save_interval=3,
        seed=0,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return GradExtArguments(**base)


def test_training_rows_equal_standalone_projection_and_are_all_written(tmp_path):
    model = make_tiny_gpt2(dtype=torch.float32)
    data = _Blocks()
    reference = KroneckerProjector(make_tiny_gpt2(dtype=torch.float32), rank_total=16, rank_min=2)
    expected = torch.cat(
        [reference.project({k: v[None] for k, v in data[i].items()}) for i in range(len(data))]
    )
    trainer = GradExtTrainer(
        model=model, args=_args(tmp_path), train_dataset=data, data_collator=default_data_collator
    )
    trainer.train()
    rows, ids, meta = load_projections(tmp_path / "out" / "projections")
    # 2 steps x 2 microbatches x 2 samples = 8 rows; save_interval 3 -> shards of 6 and 2 rows
    assert rows.shape == (8, meta["total_proj_dim"]) and ids == [-1] * 8
    assert meta["proj_rank_total"] == 16 and meta["layers"][0]["k_i"] * meta["layers"][0]["k_o"] == 16
    # rows of the first optimizer step were computed at the initial weights: each equals the
    # standalone projection of one example (the HF window rescaling is undone exactly)
    first = rows[:4].float()
    dist = torch.cdist(first, expected)
    assert float((dist.min(dim=1).values / expected.norm(dim=1).mean()).max()) < 1e-4
    stats = json.loads((tmp_path / "out" / "projections" / "projection_stats.json").read_text())
    assert stats["rows_written"] == 8 and stats["shards"] == 2


def test_no_callback_without_flag(tmp_path):
    trainer = GradExtTrainer(
        model=make_tiny_gpt2(dtype=torch.float32),
        args=_args(tmp_path, project_gradients=False),
        train_dataset=_Blocks(),
        data_collator=default_data_collator,
    )
    from hf_gradext.callbacks.projection import GradientProjectionCallback

    assert not any(isinstance(c, GradientProjectionCallback) for c in trainer.callback_handler.callbacks)


def test_bad_layer_selection_names_the_flag(tmp_path):
    from hf_gradext.errors import UserFacingError

    with pytest.raises(UserFacingError, match=r"^--proj_layers=nosuch: .*matches no module"):
        GradExtTrainer(
            model=make_tiny_gpt2(dtype=torch.float32),
            args=_args(tmp_path, proj_layers="nosuch"),
            train_dataset=_Blocks(),
        )


def test_peft_model_with_default_layers_projects_the_lora_layers(tmp_path):
    from peft import LoraConfig, get_peft_model

    from hf_gradext.projection.projector import resolve_proj_layers

    args = _args(tmp_path)
    dense = make_tiny_gpt2(dtype=torch.float32)
    assert resolve_proj_layers(args, dense) == "mlp,attn"
    lora = get_peft_model(make_tiny_gpt2(dtype=torch.float32), LoraConfig(r=2, target_modules=["c_attn"]))
    assert resolve_proj_layers(args, lora) == "lora"
    assert resolve_proj_layers(_args(tmp_path, proj_layers="attn"), lora) == "attn"  # explicit: as given


class _BlocksWithIds(_Blocks):
    def __getitem__(self, i):
        return {**super().__getitem__(i), "example_id": torch.tensor(i)}


def _index(directory):
    from hf_gradext.projection.io import PREFIX
    from hf_gradext.store import list_shards, read_shard_header

    return [
        (r["step"], r["example_id"])
        for s in list_shards(directory, PREFIX)
        for r in read_shard_header(s.path)[0]
    ]


def test_resume_rewrites_rerun_steps_without_duplicates_or_gaps(tmp_path):
    """Steps after the checkpoint are pruned and re-projected: the index equals an uninterrupted run's."""
    data = _BlocksWithIds(n=16)
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, proj_save_interval=1)

    def run(out, resume=None, max_steps=4):
        args = _args(tmp_path, output_dir=str(tmp_path / out), **{**common, "max_steps": max_steps})
        trainer = GradExtTrainer(
            model=make_tiny_gpt2(dtype=torch.float32),
            args=args,
            train_dataset=data,
            data_collator=default_data_collator,
        )
        trainer.train(resume_from_checkpoint=resume)

    run("full")
    full = _index(tmp_path / "full" / "projections")
    assert sorted({s for s, _ in full}) == [1, 2, 3, 4] and len(full) == 4 * 4

    run("cut")  # a complete run whose steps 3-4 are then re-run from checkpoint-2
    run("cut", resume=str(tmp_path / "cut" / "checkpoint-2"))
    resumed = sorted(_index(tmp_path / "cut" / "projections"))
    assert resumed == sorted(full)


def test_every_row_a_checkpoint_covers_is_on_disk_when_it_is_saved(tmp_path):
    """Shards are buffered (save_interval 100 here), yet a checkpoint never claims rows not on disk."""
    from transformers import TrainerCallback

    seen = {}

    class OnDiskAtSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            seen[state.global_step] = sorted({step for step, _ in _index(tmp_path / "out" / "projections")})

    args = _args(tmp_path, max_steps=4, save_strategy="steps", save_steps=1, proj_save_interval=100)
    trainer = GradExtTrainer(
        model=make_tiny_gpt2(dtype=torch.float32),
        args=args,
        train_dataset=_BlocksWithIds(n=16),
        data_collator=default_data_collator,
        callbacks=[OnDiskAtSave()],
    )
    trainer.train()
    assert seen == {s: list(range(1, s + 1)) for s in (1, 2, 3, 4)}
    assert len(_index(tmp_path / "out" / "projections")) == 16  # 4 steps x 2 microbatches x 2 samples
