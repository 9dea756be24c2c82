import numpy as np
import pytest
import torch

from hf_gradext.collection.stats import (
    PERCENTILES,
    collection_stats,
    group_sq_norms,
    layer_group,
    layer_norm_table,
    norm_summary,
)


def _numpy_summary(x: np.ndarray) -> dict[str, float]:
    out = {"mean": x.mean(), "std": x.std(), "min": x.min(), "max": x.max()}
    out.update({f"p{p}": np.percentile(x, p) for p in PERCENTILES})
    out["spread"] = x.std() / x.mean()
    out["max_over_median"] = x.max() / np.median(x)
    return out


@pytest.mark.parametrize("n", [1, 2, 7, 33])
def test_norm_summary_equals_numpy(n):
    x = np.random.default_rng(n).gamma(2.0, size=n)
    got = norm_summary(torch.tensor(x, dtype=torch.float32))
    want = _numpy_summary(x.astype(np.float32).astype(np.float64))
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_norm_summary_of_empty_and_zero_inputs():
    assert norm_summary(torch.zeros(0)) == {}
    zero = norm_summary(torch.zeros(3))
    assert zero["spread"] == 0.0 and zero["max_over_median"] == 0.0


def test_group_norms_add_squares_within_groups_and_total():
    sq = {
        "h.0.attn.c_attn": torch.tensor([1.0, 4.0]),
        "h.0.mlp.c_fc": torch.tensor([9.0, 0.0]),
        "h.0.attn.c_proj": torch.tensor([3.0, 5.0]),
    }
    groups = {"h.0.attn.c_attn": "attn", "h.0.attn.c_proj": "attn", "h.0.mlp.c_fc": "mlp"}
    out = group_sq_norms(sq, groups)
    torch.testing.assert_close(out["attn"], torch.tensor([4.0, 9.0]))
    torch.testing.assert_close(out["total"], torch.tensor([13.0, 9.0]))
    metrics = collection_stats(sq, groups, prefix="p")
    assert metrics["p/attn/norm_mean"] == pytest.approx((2.0 + 3.0) / 2)
    assert metrics["p/total/norm_max"] == pytest.approx(13**0.5)
    assert "p/mlp/norm_p90" in metrics and "p/embed/norm_mean" not in metrics


def test_layer_norm_table_is_per_layer_sqrt():
    table = layer_norm_table({"a": torch.tensor([4.0, 16.0])})
    assert table["a"]["mean"] == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("name", "family", "group"),
    [
        ("transformer.h.0.attn.c_attn", None, "attn"),
        ("model.layers.3.self_attn.q_proj", None, "attn"),
        ("transformer.h.1.mlp.c_fc", None, "mlp"),
        ("transformer.h.1.ln_2", None, "norm"),
        ("transformer.wte", None, "embed"),
        ("lm_head", None, "embed"),
        ("whatever", "embedding", "embed"),
        ("score", None, "other"),
    ],
)
def test_layer_group_by_name(name, family, group):
    assert layer_group(name, family) == group
