import pytest

from hf_gradext.arguments import GradExtArguments
from hf_gradext.errors import UserFacingError


def _args(**kw):
    return GradExtArguments(output_dir="/tmp/hf_gradext_test_args", report_to=[], **kw)


def test_defaults_match_issue():
    a = _args()
    assert (
        a.project_gradients,
        a.proj_layers,
        a.proj_rank_total,
        a.proj_rank_min,
        a.proj_seed,
        a.proj_dtype,
    ) == (False, "mlp,attn", 256, 8, 42, "bfloat16")
    assert not a.proj_row_orthonormal and not a.include_embeddings and a.proj_save_interval >= 1
    assert a.proj_method == "rademacher" and a.proj_split == "balanced"


@pytest.mark.parametrize(
    "kw,flag",
    [
        ({"proj_dtype": "int8"}, "--proj_dtype"),
        ({"proj_method": "sparse"}, "--proj_method"),
        ({"proj_split": "square"}, "--proj_split"),
        ({"proj_method": "rademacher", "proj_row_orthonormal": True}, "--proj_row_orthonormal"),
        ({"proj_method": "gaussian", "proj_row_orthonormal": True}, "--proj_row_orthonormal"),
        ({"proj_rank_min": 0}, "--proj_rank_min"),
        ({"proj_rank_total": 10}, "--proj_rank_total"),
        ({"proj_save_interval": 0}, "--proj_save_interval"),
        ({"proj_layers": " , "}, "--proj_layers"),
        ({"proj_layers": "mlp,(["}, "--proj_layers"),
    ],
)
def test_bad_values_name_the_flag(kw, flag):
    with pytest.raises(UserFacingError, match=flag.replace("-", r"\-")):
        _args(**kw)


def test_flags_parse_from_command_line():
    from transformers import HfArgumentParser

    (a,) = HfArgumentParser(GradExtArguments).parse_args_into_dataclasses(
        [
            "--output_dir",
            "/tmp/x",
            "--project_gradients",
            "--proj_layers",
            "transformer.h.0",
            "--proj_dtype",
            "float16",
            "--proj_row_orthonormal",
            "--include_embeddings",
            "--proj_save_interval",
            "5",
            "--proj_output_dir",
            "/tmp/p",
            "--report_to",
            "none",
        ]
    )
    assert a.project_gradients and a.proj_layers == "transformer.h.0" and a.proj_dtype == "float16"
    assert a.proj_row_orthonormal and a.include_embeddings and a.proj_save_interval == 5
    assert a.proj_method == "row_orthonormal"  # the old flag is the new one's alias


def test_proj_method_parses_and_names_match_the_matrices_module():
    from transformers import HfArgumentParser

    from hf_gradext.arguments.projection import PROJ_METHODS, PROJ_SPLITS
    from hf_gradext.projection.matrices import METHODS
    from hf_gradext.projection.ranks import SPLIT_RULES

    # the argument module stays torch-free, so the lists are written twice
    assert PROJ_METHODS == METHODS and PROJ_SPLITS == SPLIT_RULES
    (a,) = HfArgumentParser(GradExtArguments).parse_args_into_dataclasses(
        [
            "--output_dir",
            "/tmp/x",
            "--proj_method",
            "rademacher",
            "--proj_split",
            "balanced",
            "--report_to",
            "none",
        ]
    )
    assert a.proj_method == "rademacher" and not a.proj_row_orthonormal and a.proj_split == "balanced"
    assert _args(proj_method="gaussian", proj_split="cost").proj_method == "gaussian"  # the 0.1 defaults
