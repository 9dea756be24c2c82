import pytest

from hf_gradext.arguments.parsing import EMBEDDED_DEFAULTS, build_parser, parse_args
from hf_gradext.errors import UserFacingError


def test_no_flags_gives_the_embedded_default_profile():
    args = parse_args([])
    assert args.config_name == "tiny"
    assert args.learning_rate == EMBEDDED_DEFAULTS["learning_rate"]
    assert args.output_dir == EMBEDDED_DEFAULTS["output_dir"]
    assert args.block_size == EMBEDDED_DEFAULTS["block_size"]


def test_profile_is_not_applied_when_data_is_given(tmp_path):
    (tmp_path / "d.txt").write_text("hello\n")
    args = parse_args(["--train_file", str(tmp_path / "d.txt"), "--output_dir", str(tmp_path / "o")])
    assert args.learning_rate == 5e-5  # TrainingArguments' own default
    assert args.block_size is None


def test_yaml_sets_defaults_and_flags_override(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "output_dir: from_yaml\nlearning_rate: 1.0e-3\nnum_train_epochs: 7\nlogging_first_step: false\n"
        "lora_target_modules: [c_attn, c_proj]\nlr_scheduler_type: constant\n"
    )
    args = parse_args(["--config", str(cfg), "--learning_rate", "2e-4"])
    assert args.learning_rate == 2e-4  # flag wins
    assert args.num_train_epochs == 7  # YAML beats the embedded profile
    assert args.output_dir == "from_yaml"
    assert args.logging_first_step is False
    assert args.lora_target_modules == ["c_attn", "c_proj"]
    assert str(args.lr_scheduler_type.value) == "constant"
    # The flag may come before --config too.
    assert parse_args(["--num_train_epochs", "1", "--config", str(cfg)]).num_train_epochs == 1


def test_yaml_data_source_disables_profile(tmp_path):
    (tmp_path / "d.txt").write_text("hello\n")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"train_file: {tmp_path / 'd.txt'}\noutput_dir: {tmp_path / 'o'}\n")
    assert parse_args(["--config", str(cfg)]).learning_rate == 5e-5


@pytest.mark.parametrize(
    ("yaml_text", "match"),
    [
        ("learnin_rate: 0.1\n", "unknown key 'learnin_rate'.*learning_rate"),
        ("- a\n- b\n", "must be a mapping"),
        ("a: [1,\n", "not valid YAML"),
        ("lr_scheduler_type: bogus\n", "invalid choice"),
    ],
)
def test_bad_yaml(tmp_path, yaml_text, match):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(UserFacingError, match=match):
        parse_args(["--config", str(cfg)])


def test_missing_yaml():
    with pytest.raises(UserFacingError, match="does not exist"):
        parse_args(["--config", "nope.yaml"])


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--learning_rat", "1"], "unknown flag --learning_rat.*--learning_rate"),
        (["--lr_scheduler_type", "bogus"], "invalid choice"),
        (["--model_dtype", "int8"], "invalid choice"),
        (["--per_device_train_batch_size", "x"], "invalid int value"),
        (["--block_size", "0"], "--block_size"),
    ],
)
def test_bad_flags_are_one_line_errors(argv, match):
    with pytest.raises(UserFacingError, match=match) as info:
        parse_args(argv)
    assert "\n" not in str(info.value)


def test_hf_value_errors_become_user_facing():
    # TrainingArguments.__post_init__ raises a plain ValueError for this combination.
    with pytest.raises(UserFacingError):
        parse_args(
            ["--load_best_model_at_end", "true", "--eval_strategy", "steps", "--save_strategy", "epoch"]
        )


def test_aliases_and_dash_spelling():
    args = parse_args(["--torch_dtype", "float32", "--learning-rate", "0.01"])
    assert args.model_dtype == "float32" and args.learning_rate == 0.01


def test_parser_lists_our_flags():
    help_text = build_parser().format_help()
    for flag in (
        "--model_name_or_path",
        "--config_name",
        "--use_peft",
        "--early_stopping_patience",
        "--config",
    ):
        assert flag in help_text


def test_distributed_launch_without_accelerator_selects_cpu(monkeypatch):
    import torch

    from hf_gradext.arguments import parsing

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert parsing._launched_without_accelerator() is False
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert parsing._launched_without_accelerator() is (not torch.cuda.is_available())


def test_pin_memory_off_without_an_accelerator_unless_asked(monkeypatch):
    import torch

    from hf_gradext.arguments.parsing import parse_args

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if hasattr(torch, "accelerator"):
        monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert parse_args(["--output_dir", "o"]).dataloader_pin_memory is False
    assert parse_args(["--output_dir", "o", "--dataloader_pin_memory", "true"]).dataloader_pin_memory is True
