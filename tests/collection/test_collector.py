import pytest
import torch

from hf_gradext.analysis import load_gradients
from hf_gradext.collection import BatchCollector
from hf_gradext.collection.loop import loop_per_sample_gradients, selected_parameters
from hf_gradext.grad import SparseRowGrad, per_sample_grad_norms, per_sample_gradients, select_modules
from hf_gradext.store import list_shards
from tests.collection._tiny import ragged_batch, tiny_gpt2


def _dense(x):
    return x.to_dense() if isinstance(x, SparseRowGrad) else x


def _collect(model, batch, directory, **kw):
    with BatchCollector(model, directory, **kw) as collector:
        metrics = collector.collect(batch, step=7)
    return metrics


@pytest.mark.parametrize("tied", [True, False])
def test_collected_full_gradients_equal_per_sample_gradients(tmp_path, tied):
    model, batch = tiny_gpt2(tied=tied), ragged_batch()
    _collect(model, batch, tmp_path)
    ref = per_sample_gradients(model.eval(), batch)
    got = load_gradients(tmp_path)
    assert [s["example_id"] for s in got.samples] == [100, 101, 102, 103]
    assert {s["step"] for s in got.samples} == {7}
    assert set(got.grads) == set(ref)
    for name, value in ref.items():
        torch.testing.assert_close(_dense(got.grads[name]), _dense(value), rtol=1e-5, atol=1e-7)


def test_untied_embeddings_are_stored_sparse(tmp_path):
    model, batch = tiny_gpt2(tied=False), ragged_batch()
    _collect(model, batch, tmp_path, layers="embed")
    got = load_gradients(tmp_path)
    assert isinstance(got.grads["transformer.wte.weight"], SparseRowGrad)
    assert got.grads["transformer.wte.weight"].values.shape[0] <= int(batch["attention_mask"].sum())


def test_norms_equal_engine_norms_and_layers_filter(tmp_path):
    model, batch = tiny_gpt2(), ragged_batch()
    _collect(model, batch, tmp_path, save="norms", layers="attn,mlp")
    _, ref = per_sample_grad_norms(model.eval(), batch, layers="attn,mlp", per_layer=True)
    got = load_gradients(tmp_path)
    assert got.grads == {}
    for layer, norms in got.norms.items():
        params = [p for p in ref if p.rsplit(".", 1)[0] == layer]
        expected = torch.stack([ref[p] ** 2 for p in params]).sum(0).sqrt()
        torch.testing.assert_close(norms, expected.float(), rtol=1e-5, atol=1e-7)
    only_mlp = load_gradients(tmp_path, layers="mlp")
    assert only_mlp.layers and all(".mlp." in layer for layer in only_mlp.layers)


def test_chunking_under_budget_gives_same_gradients_and_bounded_peak(tmp_path):
    model, batch = tiny_gpt2(), ragged_batch()
    layers = "attn,mlp"
    big = _collect(model, batch, tmp_path / "one", layers=layers)
    # c_fc of the tiny model: 32 x 128 fp32 = 16 KiB per sample; 20 KiB budget -> one sample per chunk.
    small = _collect(model, batch, tmp_path / "chunked", layers=layers, memory_budget_mb=20 / 1024)
    assert small["grad_collection/peak_memory_mb"] <= 20 / 1024
    assert big["grad_collection/peak_memory_mb"] > small["grad_collection/peak_memory_mb"]
    assert len(list_shards(tmp_path / "chunked")) > len(list_shards(tmp_path / "one"))
    a, b = load_gradients(tmp_path / "one"), load_gradients(tmp_path / "chunked")
    for name in a.grads:
        torch.testing.assert_close(a.grads[name], b.grads[name])


def test_budget_too_small_for_one_sample_is_a_clear_error(tmp_path):
    from hf_gradext.errors import UserFacingError

    with pytest.raises(UserFacingError, match="gradient_collection_memory_budget_mb"):
        _collect(tiny_gpt2(), ragged_batch(), tmp_path, layers="mlp", memory_budget_mb=1 / 1024)


def test_storage_dtype_and_max_samples(tmp_path):
    model, batch = tiny_gpt2(), ragged_batch()
    with BatchCollector(model, tmp_path, layers="mlp", dtype="bfloat16") as collector:
        metrics = collector.collect(batch, step=1, max_samples=2)
    got = load_gradients(tmp_path)
    assert metrics["grad_collection/samples"] == 2 and len(got.samples) == 2
    assert all(t.dtype == torch.bfloat16 for t in got.grads.values())
    ref = per_sample_gradients(model.eval(), batch, layers="mlp")
    for name, t in got.grads.items():
        torch.testing.assert_close(t.float(), ref[name][:2], rtol=2e-2, atol=1e-4)


def test_loop_method_equals_engine(tmp_path):
    model, batch = tiny_gpt2(), ragged_batch()
    _collect(model, batch, tmp_path / "engine", layers="attn,norm")
    _collect(model, batch, tmp_path / "loop", layers="attn,norm", method="loop")
    a, b = load_gradients(tmp_path / "engine"), load_gradients(tmp_path / "loop")
    assert set(a.grads) == set(b.grads)
    for name in a.grads:
        torch.testing.assert_close(a.grads[name], b.grads[name], rtol=1e-4, atol=1e-6)
    for layer in a.norms:
        torch.testing.assert_close(a.norms[layer], b.norms[layer], rtol=1e-4, atol=1e-6)


def test_loop_reference_equals_float64_engine():
    model, batch = tiny_gpt2(dtype=torch.float64).eval(), ragged_batch()
    params = selected_parameters(model, select_modules(model, "all"))
    loop = loop_per_sample_gradients(model, batch, params, dtype=torch.float64)
    ref = per_sample_gradients(model, batch, dtype=torch.float64)
    # HF's causal-LM loss upcasts logits to fp32, so the loop is only fp32-accurate.
    for name, value in ref.items():
        torch.testing.assert_close(loop[name], _dense(value), rtol=1e-5, atol=1e-7)


def test_collection_leaves_param_grads_untouched(tmp_path):
    model, batch = tiny_gpt2(), ragged_batch()
    _collect(model, batch, tmp_path, save="stats")
    assert all(p.grad is None for p in model.parameters())
    assert model.training


# ------------------------------------------------------------------ output-directory policy (issue #11, item 5)
def test_directory_policy_refuse_overwrite_resume(tmp_path, caplog):
    import logging

    from hf_gradext.store import iter_index
    from hf_gradext.store.policy import OutputDirConflict

    model, batch = tiny_gpt2(), ragged_batch()
    _collect(model, batch, tmp_path, save="norms")  # step 7
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(OutputDirConflict, match=r"directory=.*overwrite=True.*resume=True"):
        BatchCollector(model, tmp_path, save="norms")
    with pytest.raises(OutputDirConflict, match="other settings"):
        BatchCollector(model, tmp_path, save="norms", layers="attn", resume=True)
    with pytest.raises(OutputDirConflict, match="another model"):
        BatchCollector(tiny_gpt2(seed=1), tmp_path, save="norms", resume=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with BatchCollector(model, tmp_path, save="norms", resume=True) as collector:  # same model and settings
        collector.collect(batch, step=8)
    assert sorted({r["step"] for r in iter_index(tmp_path)}) == [7, 8]
    other = tiny_gpt2(seed=1)
    with caplog.at_level(logging.WARNING), BatchCollector(other, tmp_path, save="norms", overwrite=True) as c:
        c.collect(batch, step=1)
    assert sorted({r["step"] for r in iter_index(tmp_path)}) == [1] and "removed 2 file(s)" in caplog.text
