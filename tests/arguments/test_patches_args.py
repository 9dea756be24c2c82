"""PatchesArguments: flags parse through HfArgumentParser and bad combinations fail at parse time."""

from __future__ import annotations

import pytest
from transformers import HfArgumentParser

from hf_gradext import GradExtArguments
from hf_gradext.errors import UserFacingError


def _parse(*flags: str) -> GradExtArguments:
    (args,) = HfArgumentParser(GradExtArguments).parse_args_into_dataclasses(
        ["--output_dir", "/tmp/unused", *flags]
    )
    return args


def test_defaults():
    args = _parse()
    assert args.gpt2_causal_mask_cache is None  # auto: on for GPT-2
    assert not args.gpt2_rms_norm and not args.gpt2_swiglu and args.swiglu_hidden_size is None
    assert args.throughput_logging


def test_flags_parse():
    args = _parse(
        "--gpt2_causal_mask_cache",
        "false",
        "--gpt2_rms_norm",
        "--gpt2_swiglu",
        "--swiglu_hidden_size",
        "64",
        "--no_throughput_logging",
    )
    assert args.gpt2_causal_mask_cache is False and args.gpt2_rms_norm and args.gpt2_swiglu
    assert args.swiglu_hidden_size == 64 and not args.throughput_logging


def test_every_patch_flag_has_help():
    from dataclasses import fields

    from hf_gradext.arguments.patches import PatchesArguments

    for f in fields(PatchesArguments):
        assert len(f.metadata.get("help", "")) > 30, f.name


def test_hidden_size_needs_swiglu():
    with pytest.raises(UserFacingError, match="--gpt2_swiglu"):
        _parse("--swiglu_hidden_size", "64")
    with pytest.raises(UserFacingError, match="positive integer"):
        _parse("--gpt2_swiglu", "--swiglu_hidden_size", "0")
