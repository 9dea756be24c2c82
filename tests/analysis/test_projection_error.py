import json

import pytest
import torch

from hf_gradext.analysis.projection_error import dense_gaussian_projection, pairwise_error_metrics
from hf_gradext.analysis.projection_error_cli import main
from hf_gradext.grad import per_sample_gradients
from hf_gradext.projection import KroneckerProjector
from hf_gradext.projection.full_grads import META_FILE
from hf_gradext.projection.io import ProjectionShardWriter, write_json_atomic
from hf_gradext.store import ShardWriter
from tests.projection.conftest import make_batch, make_tiny_gpt2


def test_pairwise_metrics_match_loop_oracle():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(5, 30, generator=gen, dtype=torch.float64)
    proj = ref[:, :12] * 1.3 + 0.1 * torch.randn(5, 12, generator=gen, dtype=torch.float64)
    m = pairwise_error_metrics(proj, ref)
    nd, cs, dr_num, dr_den = [], [], [], []
    for i in range(5):
        for j in range(i + 1, 5):
            d, dh = float(ref[i] @ ref[j]), float(proj[i] @ proj[j])
            ni, nj = float(ref[i].norm()), float(ref[j].norm())
            nd.append(((dh - d) / (ni * nj)) ** 2)
            cs.append((dh / float(proj[i].norm() * proj[j].norm()) - d / (ni * nj)) ** 2)
            dr_num.append((dh - d) ** 2)
            dr_den.append(d**2)
    assert m["num_pairs"] == 10
    assert m["normalized_dot_rmse"] == pytest.approx((sum(nd) / 10) ** 0.5, rel=1e-12)
    assert m["cosine_rmse"] == pytest.approx((sum(cs) / 10) ** 0.5, rel=1e-12)
    assert m["dot_relative_rmse"] == pytest.approx((sum(dr_num) / sum(dr_den)) ** 0.5, rel=1e-12)
    assert pairwise_error_metrics(ref, ref)["cosine_rmse"] == pytest.approx(0, abs=1e-12)


def test_dense_gaussian_projection_is_chunk_independent_gaussian():
    g = torch.randn(3, 10, dtype=torch.float64)
    a = dense_gaussian_projection(g, 7, seed=1, chunk=4)
    gen = torch.Generator().manual_seed(1)
    r = torch.cat(
        [
            torch.randn(4, 7, generator=gen, dtype=torch.float64),
            torch.randn(4, 7, generator=gen, dtype=torch.float64),
            torch.randn(2, 7, generator=gen, dtype=torch.float64),
        ]
    )
    torch.testing.assert_close(a, g @ r / 7**0.5)


@pytest.mark.slow
def test_error_decreases_with_dimension_and_is_within_2x_of_dense_gaussian():
    """Per-sample gradients with many tokens (T=64) on a 64-wide layer stack.

    The Kronecker estimator's variance has ``2/k_i + 2/k_o`` terms that only average out when the
    per-sample gradient has a high effective rank; the 2x bound is asserted where each factor is at most
    a quarter of its dimension (the regime of real models: GPT-2 small has k_i <= 32 of 768). At D=1024
    here (k_i = d_in / 2) the measured ratio is ~2.0, and with T=7 on a 16-wide model up to 2.75x
    (see docs/projection.md).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    cfg = GPT2Config(
        n_layer=1,
        n_embd=64,
        n_head=2,
        vocab_size=61,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg).double().eval()
    batch = make_batch(lengths=(64,) * 12, seq=64, seed=5)
    ranks, seeds = (16, 64, 256), range(3)
    first = KroneckerProjector(model, rank_total=16, rank_min=4)
    grads = per_sample_gradients(model, batch, layers=first.capture_layers(), dtype=torch.float64)
    exact = torch.cat([grads[b.weight_name].reshape(12, -1) for b in first.blocks], 1)  # (12, P)
    kron, dense = [], []
    for r in ranks:
        rows = [KroneckerProjector(model, rank_total=r, rank_min=4, seed=s).project(batch) for s in seeds]
        dim = rows[0].shape[1]
        kron.append(sum(pairwise_error_metrics(x, exact)["normalized_dot_rmse"] for x in rows) / len(seeds))
        dense.append(
            sum(
                pairwise_error_metrics(dense_gaussian_projection(exact, dim, seed=s), exact)[
                    "normalized_dot_rmse"
                ]
                for s in seeds
            )
            / len(seeds)
        )
    assert kron[0] > kron[1] > kron[2]
    assert kron[0] <= 2 * dense[0] and kron[1] <= 2 * dense[1], (kron, dense)


def _write_dirs(tmp_path, ranks=(4, 16, 64)):
    model = make_tiny_gpt2(seed=1)
    batch = make_batch(lengths=(7, 6, 7, 5, 7, 7), seq=7, seed=2)
    n = batch["input_ids"].shape[0]
    dirs = []
    for r in ranks:
        proj = KroneckerProjector(model, rank_total=r, rank_min=2, dtype="float32")
        d = tmp_path / f"r{r}"
        write_json_atomic(d.mkdir() or d / "metadata.json", proj.metadata())
        writer = ProjectionShardWriter(d, dtype=torch.float32)
        writer.add(proj.project(batch), [{"example_id": i} for i in range(n)])
        writer.close()
        dirs.append(d)
    grads = per_sample_gradients(model, batch, layers="all", dtype=torch.float64)
    slices, start, flat = {}, 0, []
    for name, g in grads.items():
        g = g if isinstance(g, torch.Tensor) else g.to_dense()
        slices[name] = {"start": start, "end": start + g[0].numel(), "shape": list(g.shape[1:])}
        start += g[0].numel()
        flat.append(g.reshape(n, -1))
    fg = tmp_path / "fg"
    with ShardWriter(fg, prefix="fullgrad") as w:
        w.write({"grad": torch.cat(flat, 1).float()}, [{"example_id": i} for i in range(n)])
    write_json_atomic(fg / META_FILE, {"param_slices": slices, "total_param_dim": start})
    return dirs, fg


@pytest.mark.parametrize("kind", ["full_layers", "naive", "full", "projection"])
def test_cli_writes_json_png_pdf(tmp_path, kind, capsys):
    dirs, fg = _write_dirs(tmp_path)
    ref = dirs[-1] if kind == "projection" else fg
    out = tmp_path / "out"
    argv = [
        "--proj_dirs",
        *map(str, dirs),
        "--reference_kind",
        kind,
        "--reference_dir",
        str(ref),
        "--output_dir",
        str(out),
        "--dense_baseline",
    ]
    assert main(argv) == 0
    report = json.loads((out / "projection_error.json").read_text())
    dims = [r["dim"] for r in report["results"]]
    assert dims == sorted(dims) and len(dims) == 3 and len(report["example_ids"]) == 6
    assert (out / "projection_error.png").stat().st_size > 0 and (
        out / "projection_error.pdf"
    ).stat().st_size > 0
    if kind == "naive":  # float32 rows vs naive float64 projection: pure numerics
        assert all(r["max_abs_elementwise_error_rel"] < 1e-5 for r in report["results"])
    if kind in ("full_layers", "full"):
        assert all("dense_gaussian" in r for r in report["results"])


def test_cli_bad_reference_is_one_line_error(tmp_path, capsys):
    dirs, _ = _write_dirs(tmp_path, ranks=(4,))
    assert (
        main(["--proj_dirs", str(dirs[0]), "--reference_kind", "full", "--reference_dir", str(tmp_path)]) == 2
    )
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.parametrize("kind", ["projection", "full_layers"])
def test_cli_refuses_directories_that_project_different_weights(tmp_path, kind, capsys):
    dirs, fg = _write_dirs(tmp_path, ranks=(4, 16))
    other = tmp_path / "mlp_only"
    model = make_tiny_gpt2(seed=1)
    proj = KroneckerProjector(model, layers="mlp", rank_total=16, rank_min=2, dtype="float32")
    write_json_atomic(other.mkdir() or other / "metadata.json", proj.metadata())
    batch = make_batch(lengths=(7, 6, 7, 5, 7, 7), seq=7, seed=2)
    writer = ProjectionShardWriter(other, dtype=torch.float32)
    writer.add(proj.project(batch), [{"example_id": i} for i in range(6)])
    writer.close()
    if kind == "projection":  # the reference projects fewer weights than the runs
        argv = ["--proj_dirs", *map(str, dirs), "--reference_dir", str(other)]
    else:  # one run differs from the others
        argv = ["--proj_dirs", str(dirs[0]), str(other), "--reference_dir", str(fg)]
    assert main([*argv, "--reference_kind", kind, "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "project different weights" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # refused before any work
