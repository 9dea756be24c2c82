import numpy as np
import pytest
import torch

from hf_gradext.analysis import (
    attention_summary,
    layer_statistics,
    load_gradients,
    norms_over_steps,
    similarity_matrix,
)
from hf_gradext.collection import BatchCollector
from hf_gradext.errors import UserFacingError
from hf_gradext.grad import gradient_similarity, per_sample_gradients
from tests.collection._tiny import ragged_batch, tiny_gpt2


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """Two steps of full gradients of an untied model (sparse wte rows) plus the model and batches."""
    directory = tmp_path_factory.mktemp("grads")
    model = tiny_gpt2(tied=False)
    batches = {3: ragged_batch(seed=1), 6: ragged_batch(lengths=(5, 12, 8), seed=2)}
    with BatchCollector(model, directory) as collector:
        for step, batch in batches.items():
            collector.collect(batch, step=step)
    return directory, model.eval(), batches


def test_load_filters_by_step_and_layers(collected):
    directory, _, _ = collected
    everything = load_gradients(directory)
    assert everything.steps == [3, 6] and len(everything.samples) == 7
    one = load_gradients(directory, step=6)
    assert [s["example_id"] for s in one.samples] == [100, 101, 102]
    attn = load_gradients(directory, layers="attn")
    assert attn.layers and all(attn.groups[layer] == "attn" for layer in attn.layers)
    assert all(".attn." in p for p in attn.grads)
    rx = load_gradients(directory, layers=[r"h\.1\.mlp\.c_fc$", "embed"], with_grads=False)
    assert set(rx.layers) == {"transformer.h.1.mlp.c_fc", "transformer.wte", "transformer.wpe"}
    assert rx.grads == {}


def test_load_errors_name_the_problem(collected, tmp_path):
    directory, _, _ = collected
    with pytest.raises(UserFacingError, match="no gradient shards"):
        load_gradients(tmp_path)
    with pytest.raises(UserFacingError, match="steps on disk"):
        load_gradients(directory, step=99)


def test_layer_statistics_equal_numpy(collected):
    directory, _, _ = collected
    data = load_gradients(directory, with_grads=False)
    table = layer_statistics(data)
    for layer, row in table.items():
        x = data.norms[layer].double().numpy()
        assert row["n"] == len(x)
        assert row["mean"] == pytest.approx(x.mean()) and row["std"] == pytest.approx(x.std())
        assert row["p90"] == pytest.approx(np.percentile(x, 90))
    step6 = layer_statistics(data, step=6)
    assert all(row["n"] == 3 for row in step6.values())
    layers, steps, mat = norms_over_steps(data)
    assert steps == [3, 6] and mat.shape == (len(layers), 2)
    assert mat[0, 1].item() == pytest.approx(data.norms[layers[0]][4:].double().mean().item())


@pytest.mark.parametrize("kind", ["cosine", "dot"])
def test_similarity_equals_engine(collected, kind):
    directory, model, batches = collected
    data = load_gradients(directory, step=3)
    got = similarity_matrix(data, kind)
    ref = gradient_similarity(model, batches[3], kind=kind).double()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_similarity_per_layer_and_step_restriction(collected):
    directory, model, batches = collected
    data = load_gradients(directory)
    layer = "transformer.h.0.mlp.c_fc"
    got = similarity_matrix(data, "dot", layer=layer, step=6)
    ref = per_sample_gradients(model, batches[6], layers=r"h\.0\.mlp\.c_fc$")
    flat = torch.cat([ref[p].flatten(1) for p in data.params[layer]], 1).double()
    torch.testing.assert_close(got, flat @ flat.T, rtol=1e-4, atol=1e-7)
    with pytest.raises(UserFacingError, match="no stored gradients"):
        similarity_matrix(data, layer="nope")
    with pytest.raises(UserFacingError, match="cosine or dot"):
        similarity_matrix(data, "euclid")


def test_attention_summary_splits_c_attn_into_qkv(collected):
    directory, model, batches = collected
    data = load_gradients(directory, step=3, layers="attn")
    summary = attention_summary(data)
    layer = "transformer.h.1.attn.c_attn"
    assert set(summary) == {
        layer,
        "transformer.h.1.attn.c_proj",
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
    }
    ref = per_sample_gradients(model, batches[3], layers=r"h\.1\.attn\.c_attn$")
    w, b = ref[f"{layer}.weight"], ref[f"{layer}.bias"]  # (B, 32, 96), (B, 96)
    d = w.shape[-1] // 3
    sq = [
        w[..., i * d : (i + 1) * d].pow(2).sum((1, 2)) + b[:, i * d : (i + 1) * d].pow(2).sum(1)
        for i in range(3)
    ]
    for part, s in zip("qkv", sq):
        assert summary[layer][f"{part}_norm_mean"] == pytest.approx(s.sqrt().mean().item(), rel=1e-4)
        assert summary[layer][f"{part}_sq_share"] == pytest.approx(
            (s.sum() / sum(x.sum() for x in sq)).item(), rel=1e-4
        )
    assert "q_norm_mean" not in summary["transformer.h.1.attn.c_proj"]


def test_cli_prints_table_and_writes_pngs(collected, tmp_path, capsys):
    from hf_gradext.cli import main

    directory, _, _ = collected
    assert main(["analyze", "gradients", str(directory), "--out", str(tmp_path), "--step", "3"]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.0.mlp.c_fc" in out and "spread" in out and "c_attn split" in out
    for name in ("norms_over_steps.png", "similarity_cosine.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_cli_errors_and_norms_only(tmp_path, capsys):
    from hf_gradext.analysis.gradients_cli import main

    assert main([str(tmp_path)]) == 2
    assert "no gradient shards" in capsys.readouterr().err
    with BatchCollector(tiny_gpt2(), tmp_path, save="norms", layers="mlp") as collector:
        collector.collect(ragged_batch(), step=1)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "similarity plot skipped" in out and (tmp_path / "analysis" / "norms_over_steps.png").exists()
    with pytest.raises(UserFacingError, match="--gradient_collection_save full"):
        similarity_matrix(load_gradients(tmp_path))
