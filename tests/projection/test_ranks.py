import pytest

from hf_gradext.errors import UserFacingError
from hf_gradext.projection.ranks import split_rank


def _brute(d_in, d_out, total, kmin, rule="cost"):
    """Oracle: enumerate every admissible pair and apply the documented rule."""
    hi_i = max(kmin, min(d_in, total // kmin))
    hi_o = max(kmin, min(d_out, total // kmin))
    pairs = [(i, o) for i in range(kmin, hi_i + 1) for o in range(kmin, hi_o + 1)]

    def key(p):
        balance = -min(p) if rule == "balanced" else 0
        return (abs(p[0] * p[1] - total), balance, d_in * p[0] + d_out * p[1], p[0])

    return min(pairs, key=key)


@pytest.mark.parametrize(
    "d_in,d_out,total,kmin",
    [
        (768, 2304, 256, 8),
        (768, 768, 256, 8),
        (3072, 768, 256, 8),
        (32, 96, 256, 8),
        (50, 7, 100, 3),
        (32, 128, 64, 4),
        (5, 5, 64, 8),
        (768, 768, 1000, 8),
        (768, 768, 4096, 16),
    ],
)
@pytest.mark.parametrize("rule", ["cost", "balanced"])
def test_split_rank_matches_brute_force_rule(d_in, d_out, total, kmin, rule):
    assert split_rank(d_in, d_out, total, kmin, rule) == _brute(d_in, d_out, total, kmin, rule)


def test_split_rank_gpt2_small_values():
    assert split_rank(768, 2304, 256, 8) == (32, 8)
    assert split_rank(768, 768, 256, 8) == (16, 16)
    assert split_rank(768, 3072, 256, 8) == (32, 8)
    assert split_rank(3072, 768, 256, 8) == (8, 32)


def test_balanced_split_gpt2_small_values():
    assert split_rank(768, 2304, 256, 8, "balanced") == (16, 16)
    assert split_rank(3072, 768, 256, 8, "balanced") == (16, 16)
    assert split_rank(64, 192, 512, 8, "balanced") == (32, 16)  # no square: the cheaper of 16x32 / 32x16
    with pytest.raises(ValueError, match="rule="):
        split_rank(64, 64, 64, 8, "square")


def test_split_rank_both_at_least_min():
    k_i, k_o = split_rank(4, 4, 256, 8)
    assert k_i >= 8 and k_o >= 8


@pytest.mark.parametrize("total,kmin", [(32, 8), (10, 0)])
def test_split_rank_rejects_bad_values(total, kmin):
    with pytest.raises(UserFacingError, match="--proj_rank"):
        split_rank(64, 64, total, kmin)
