"""``--gqc*`` flags: parse-time validation names the flag."""

from __future__ import annotations

import pytest

from hf_gradext.arguments import GradExtArguments
from hf_gradext.errors import UserFacingError


def _args(tmp_path, **kw):
    return GradExtArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)


@pytest.mark.parametrize(
    "kw, flag",
    [
        ({"gqc": "gnts", "gradient_accumulation_steps": 4}, "--gradient_accumulation_steps"),
        ({"gqc": "gnts", "gqc_max_microbatches": 0}, "--gqc_max_microbatches"),
        ({"gqc": "sbc", "gqc_threshold_start": 0.5}, "--gqc sbc"),
        ({"gqc": "gnts", "gqc_warmup_ratio": 1.5}, "--gqc_warmup_ratio"),
        ({"gqc": "mht", "gqc_mht_confidence": 1.0}, "--gqc_mht_confidence"),
        ({"gqc": "sbc", "gqc_threshold_start": 8, "gqc_threshold_mode": "relative"}, "--gqc_threshold_mode"),
        ({"gqc": "gns", "gqc_warmup_multiplier": 0}, "--gqc_warmup_multiplier"),
        ({"gqc": "bogus"}, "--gqc"),
    ],
)
def test_invalid_combinations_fail_at_parse_time(tmp_path, kw, flag):
    with pytest.raises(UserFacingError, match=flag):
        _args(tmp_path, **kw)


def test_fp16_refused_with_a_clear_message(tmp_path):
    with pytest.raises(UserFacingError, match="--fp16 .*--bf16"):
        _args(tmp_path, gqc="gnts", fp16=True)


def test_valid_and_none_defaults(tmp_path):
    a = _args(tmp_path, gqc="gnts", gqc_threshold_start=0.8)
    assert a.gqc_threshold_end == 0.8  # end defaults to start
    assert _args(tmp_path).gqc == "none"
    assert (
        _args(tmp_path, gradient_accumulation_steps=4).gradient_accumulation_steps == 4
    )  # none: HF untouched


def test_cli_flags_parse(tmp_path):
    from transformers import HfArgumentParser

    (a,) = HfArgumentParser(GradExtArguments).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--gqc",
            "gnts",
            "--gqc_schedule",
            "cosine",
            "--gqc_threshold_end",
            "0.3",
            "--report_to",
            "none",
            "--use_cpu",
        ]
    )
    assert a.gqc == "gnts" and a.gqc_schedule == "cosine" and a.gqc_threshold_end == 0.3


@pytest.mark.parametrize(
    "kw, env, words",
    [
        ({"deepspeed": {"train_batch_size": "auto"}}, {}, r"does not support DeepSpeed: .*use DDP"),
        ({}, {"ACCELERATE_USE_DEEPSPEED": "true"}, r"does not support DeepSpeed"),
        ({"fsdp": True}, {}, r"does not support FSDP: .*sharded DTensor gradients; use DDP .*cpu_ddp\.yaml"),
        ({}, {"ACCELERATE_USE_FSDP": "true"}, r"does not support FSDP"),
    ],
)
def test_deepspeed_and_fsdp_refused_at_parse_time(tmp_path, monkeypatch, kw, env, words):
    # Before HF's own __post_init__ (which would set up the DeepSpeed / FSDP plugin) and any model load.
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserFacingError, match=words) as info:
        _args(tmp_path, gqc="gnts", **kw)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("scheduler", ["reduce_lr_on_plateau", "greedy"])
def test_metric_driven_schedulers_are_accepted(tmp_path, scheduler):
    # They work with GQC (stepped by HF's evaluation): see test_guards.py for the LR they produce.
    a = _args(tmp_path, gqc="gnts", lr_scheduler_type=scheduler, eval_strategy="steps", eval_steps=1)
    assert a.lr_scheduler_type == scheduler
