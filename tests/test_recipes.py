"""The recipes are data: each parses, and each carries the header the README promises."""

from pathlib import Path

import pytest

from hf_gradext.arguments.parsing import EMBEDDED_DEFAULTS, parse_args
from tests.helpers import REPO_ROOT, load_script

RECIPES = REPO_ROOT / "recipes"
ACCELERATE_CONFIGS = sorted((RECIPES / "accelerate").glob("*.yaml"))
RUN_CONFIGS = sorted(RECIPES.glob("*.yaml"))


def header(path: Path) -> str:
    return "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))


def test_expected_recipe_files_exist():
    names = {p.name for p in ACCELERATE_CONFIGS}
    assert {
        "cpu.yaml",
        "cpu_ddp.yaml",
        "single_gpu_bf16.yaml",
        "multi_gpu_bf16.yaml",
        "fsdp_bf16.yaml",
    } <= names
    assert {"tiny_default.yaml", "gpt2_small_tinystories.yaml"} <= {p.name for p in RUN_CONFIGS}


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS + RUN_CONFIGS, ids=lambda p: p.name)
def test_header_has_hardware_expected_result_and_launch_line(path):
    text = header(path)
    for key in ("Hardware:", "Expected result:", "accelerate launch --config_file recipes/accelerate/"):
        assert key in text, f"{path.name}: header lacks {key!r}"


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    if "bf16" in path.name:
        assert config.mixed_precision == "bf16"
    if path.name == "cpu_ddp.yaml":
        assert config.num_processes == 2


def test_tiny_default_yaml_is_the_embedded_default():
    from_yaml = parse_args(["--config", str(RECIPES / "tiny_default.yaml")])
    default = parse_args([])
    for key in EMBEDDED_DEFAULTS:
        assert getattr(from_yaml, key) == getattr(default, key), key


def test_gpt2_small_recipe_parses_with_bf16_switched_off():
    args = parse_args(["--config", str(RECIPES / "gpt2_small_tinystories.yaml"), "--bf16", "false"])
    assert args.config_name == "small" and args.dataset_name == "roneneldan/TinyStories"
    assert args.tokenizer_name == "gpt2"


def test_flags_table_lists_every_model_data_flag():
    module = load_script(RECIPES / "make_flags_table.py")
    table = module.flags_table()
    from dataclasses import fields

    from hf_gradext.arguments.model import ModelDataArguments

    for f in fields(ModelDataArguments):
        assert f"`--{f.name}`" in table
    assert "auto, bfloat16, float16, float32" in table  # choices column
    assert "`--learning_rate`" not in table  # HF's own flags are left to --help
