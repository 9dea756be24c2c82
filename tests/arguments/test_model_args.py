import pytest

from hf_gradext.arguments import GradExtArguments
from hf_gradext.arguments.model import BUILTIN_GPT2_SIZES
from hf_gradext.errors import UserFacingError


def make(tmp_path, **kw):
    return GradExtArguments(output_dir=str(tmp_path / "out"), report_to="none", **kw)


def test_defaults_build_the_tiny_model(tmp_path):
    args = make(tmp_path)
    assert args.config_name == "tiny"
    assert args.model_name_or_path is None and args.dataset_name is None
    assert args.validation_split_percentage == 5 and args.block_size is None


def test_every_field_has_help():
    from dataclasses import fields

    from hf_gradext.arguments.model import ModelDataArguments

    for f in fields(ModelDataArguments):
        assert f.metadata.get("help"), f.name


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"block_size": 0}, "--block_size"),
        ({"max_train_samples": 0}, "--max_train_samples"),
        ({"validation_split_percentage": 100}, "--validation_split_percentage"),
        ({"dataset_name": "x", "train_file": "y.txt"}, "--dataset_name"),
        ({"validation_file": "v.txt"}, "--validation_file"),
        ({"train_file": "missing.txt"}, "--train_file"),
        ({"train_file": "data.parquet"}, "--train_file"),
        ({"model_name_or_path": "gpt2", "config_name": "tiny"}, "--config_name"),
        ({"model_name_or_path": "gpt2", "config_overrides": "n_layer=2"}, "--config_overrides"),
        ({"model_dtype": "int8"}, "--model_dtype"),
        ({"lora_r": 0}, "--lora_r"),
        ({"lora_dropout": 1.5}, "--lora_dropout"),
        ({"tokenizer_vocab_size": 10}, "--tokenizer_vocab_size"),
        ({"early_stopping_patience": 2}, "--eval_strategy"),
        ({"early_stopping_patience": 0, "eval_strategy": "steps"}, "--early_stopping_patience"),
    ],
)
def test_bad_values_name_the_flag(tmp_path, kwargs, flag):
    with pytest.raises(UserFacingError) as info:
        make(tmp_path, **kwargs)
    assert flag in str(info.value)
    assert "\n" not in str(info.value)


def test_existing_train_file_is_accepted(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "hi"}\n')
    assert make(tmp_path, train_file=str(tmp_path / "d.jsonl")).train_file.endswith("d.jsonl")


def test_early_stopping_defaults_to_eval_loss(tmp_path):
    args = make(tmp_path, early_stopping_patience=2, eval_strategy="steps", eval_steps=5)
    assert args.metric_for_best_model == "loss"
    assert args.greater_is_better is False


def test_builtin_sizes():
    assert set(BUILTIN_GPT2_SIZES) >= {"tiny", "small", "medium"}
    small = BUILTIN_GPT2_SIZES["small"]
    assert (small["n_layer"], small["n_embd"], small["n_head"], small["n_positions"]) == (12, 768, 12, 1024)


def test_hub_kwargs_reads_the_hub_flags_with_defaults():
    from types import SimpleNamespace

    from hf_gradext.arguments.model import hub_kwargs

    assert hub_kwargs(SimpleNamespace()) == {
        "cache_dir": None,
        "revision": "main",
        "trust_remote_code": False,
    }
    args = SimpleNamespace(cache_dir="/c", model_revision="v1", trust_remote_code=True)
    assert hub_kwargs(args) == {"cache_dir": "/c", "revision": "v1", "trust_remote_code": True}
