"""``--proj_precondition*``: Adam-preconditioned rows from ``hf-gradext project`` / ``full-grads``, and the
refusals (bad path at parse time, training, resume and attribute across other preconditioning)."""

import json

import pytest
import torch

from hf_gradext.arguments.projection import ProjectionArguments
from hf_gradext.errors import UserFacingError
from hf_gradext.projection import AdamPreconditioner, KroneckerProjector, load_projections
from hf_gradext.projection.cli import attribute_main, full_grads_main, project_main
from tests.projection.conftest import make_tiny_gpt2, oracle_grads
from tests.projection.test_cli import MODEL, PROJ


def _pass_model_and_data(n=4):
    """The model and the first ``n`` blocks ``hf-gradext project`` sees with MODEL (from scratch, seed 3)."""
    from transformers import set_seed

    from hf_gradext.arguments.model import ModelDataArguments
    from hf_gradext.projection.dataset_pass import (
        ProjectRunArguments,
        load_data_for_pass,
        load_model_for_pass,
    )

    margs = ModelDataArguments(config_overrides="n_layer=2,n_embd=32,n_head=2", block_size=16)
    margs._validate_model_data()
    set_seed(0)
    rargs = ProjectRunArguments(max_samples=n, seed=3)
    tokenizer, model = load_model_for_pass(margs, rargs, 16)
    data = load_data_for_pass(margs, rargs, tokenizer)
    ids = torch.as_tensor(data[:n]["input_ids"])  # (n, 16) blocks: no padding
    return model.eval(), {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run output dir whose newest checkpoint holds an AdamW optimizer.pt for the pass's model.

    lr=0: the weights stay those `project` rebuilds; the second moments still change (random gradients
    of very different scales per entry, so the scale is far from uniform and preconditioning shows).
    """
    root = tmp_path_factory.mktemp("run")
    model, _ = _pass_model_and_data()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.0, weight_decay=0.0)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * torch.rand(p.shape, generator=gen) ** 3
        optimizer.step()
    for step in (1, 3):  # the newest (checkpoint-3) must be the one used
        (root / f"checkpoint-{step}").mkdir()
    torch.save(optimizer.state_dict(), root / "checkpoint-3" / "optimizer.pt")
    torch.save({"state": {}, "param_groups": []}, root / "checkpoint-1" / "optimizer.pt")
    return root


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    assert (
        project_main([*MODEL, *PROJ, "--output_dir", str(out), "--max_samples", "4", "--batch_size", "2"])
        == 0
    )
    return out


def _project(out, run_dir, mode, *extra):
    argv = [*MODEL, *PROJ, "--output_dir", str(out), "--max_samples", "4", "--batch_size", "2"]
    return project_main(
        [*argv, "--proj_precondition", str(run_dir), "--proj_precondition_mode", mode, *extra]
    )


@pytest.mark.parametrize("mode", ["rank1", "adafactor"])
def test_project_rows_are_the_factored_preconditioned_gradients(run_dir, plain_dir, tmp_path, mode):
    assert _project(tmp_path / "pre", run_dir, mode) == 0
    rows, ids, meta = load_projections(tmp_path / "pre")
    assert ids == [0, 1, 2, 3]
    pre_meta = meta["preconditioning"]
    assert pre_meta["mode"] == mode and pre_meta["power"] == 1.0 and pre_meta["step"] == 3
    assert pre_meta["source"].endswith("checkpoint-3/optimizer.pt")
    model, batch = _pass_model_and_data()
    pre = AdamPreconditioner.from_checkpoint(run_dir / "checkpoint-3", model)
    assert pre_meta["state_sha256"] == pre.fingerprint()
    plain = KroneckerProjector.from_metadata(meta, model)  # the plain P
    names = [b.weight_name for b in plain.blocks]
    exact = {n: g.double() for n, g in oracle_grads(model, batch, names).items()}
    scaled = {n: exact[n] * torch.outer(*pre.factored(n, mode)) for n in names}  # (B, *shape)
    expected = plain.naive_project(scaled)
    assert float((rows.double() - expected).abs().max() / expected.abs().max()) < 1e-4
    # Preconditioning was applied (not silently skipped): the plain rows are far from these.
    unscaled, _, _ = load_projections(plain_dir)
    assert float((unscaled.double() - expected).abs().max() / expected.abs().max()) > 0.1


def test_adafactor_factor_is_row_times_column_sums_over_total():
    model = make_tiny_gpt2()
    gen = torch.Generator().manual_seed(3)
    rank_one, general = {}, {}
    for name, p in model.named_parameters():
        if p.dim() == 2:
            a = torch.rand(p.shape[0], generator=gen, dtype=torch.float64) + 0.1
            b = torch.rand(p.shape[1], generator=gen, dtype=torch.float64) + 0.1
            rank_one[name] = torch.outer(a, b) * 1e-4
            general[name] = torch.rand(*p.shape, generator=gen, dtype=torch.float64) ** 4 * 1e-4
    pre = AdamPreconditioner(rank_one, eps=0.0, power=1.0)
    for name, v in rank_one.items():
        r, c = v.sum(dim=1), v.sum(dim=0)  # (m,), (n,)
        approx_v = torch.outer(r, c) / r.sum()
        torch.testing.assert_close(approx_v, v)  # exact on a rank-1 v
        u, w = pre.factored(name, "adafactor")
        torch.testing.assert_close(torch.outer(u, w), approx_v.pow(-0.5))
    assert max(pre.factor_error("adafactor").values()) < 1e-10
    # On a general v both are approximations; rank1 (Frobenius-optimal for the scale) is never worse.
    noisy = AdamPreconditioner(general, eps=1e-8, power=1.0)
    ada, r1 = noisy.factor_error("adafactor"), noisy.factor_error("rank1")
    assert all(0 < r1[n] <= ada[n] + 1e-12 for n in general) and all(ada[n] < 1 for n in general)


def test_full_grads_with_the_flag_stores_exactly_scaled_gradients(run_dir, plain_dir, tmp_path):
    from hf_gradext.arguments.model import ModelDataArguments
    from hf_gradext.projection.cli import FullGradsArguments
    from hf_gradext.projection.full_grads import load_full_grads, run_full_grads

    margs = ModelDataArguments(config_overrides="n_layer=2,n_embd=32,n_head=2", block_size=16)
    margs._validate_model_data()
    fargs = FullGradsArguments(
        output_dir=str(tmp_path / "fg"), max_samples=4, batch_size=2, layers="projected",
        proj_metadata=str(plain_dir), seed=3, grad_dtype="float64",
        proj_precondition=str(run_dir), proj_precondition_power=0.5,
    )  # fmt: skip
    run_full_grads(margs, fargs)
    grads, ids, meta = load_full_grads(tmp_path / "fg")
    assert ids == [0, 1, 2, 3] and meta["preconditioning"]["mode"] == "exact"
    model, batch = _pass_model_and_data()
    pre = AdamPreconditioner.from_checkpoint(run_dir / "checkpoint-3", model, power=0.5)
    names = list(meta["param_slices"])
    exact = oracle_grads(model, batch, names)
    for name, sl in meta["param_slices"].items():
        got = grads[:, sl["start"] : sl["end"]].reshape(-1, *sl["shape"])
        want = exact[name].double() / (pre.second_moments[name].sqrt() + pre.eps).sqrt()
        assert float((got - want).abs().max() / want.abs().max()) < 1e-4, name
        assert float((got - exact[name].double()).abs().max() / want.abs().max()) > 0.1  # really scaled


def _one_line_error(fn):
    with pytest.raises(UserFacingError) as info:
        fn()
    text = str(info.value)
    assert "\n" not in text and "--proj_precondition" in text
    return text


def test_bad_paths_are_refused_at_parse_time(tmp_path, capsys):
    text = _one_line_error(
        lambda: ProjectionArguments(proj_precondition=str(tmp_path / "nowhere"))._validate_projection()
    )
    assert "no such file" in text
    (tmp_path / "empty" / "checkpoint-5").mkdir(parents=True)
    text = _one_line_error(
        lambda: ProjectionArguments(proj_precondition=str(tmp_path / "empty"))._validate_projection()
    )
    assert "optimizer.pt" in text
    _one_line_error(lambda: ProjectionArguments(proj_precondition_power=0.0)._validate_projection())
    _one_line_error(lambda: ProjectionArguments(proj_precondition_mode="full")._validate_projection())
    # From the command line: exit 2, one line, nothing written.
    out = tmp_path / "never"
    assert (
        project_main(
            [*MODEL, *PROJ, "--output_dir", str(out), "--proj_precondition", str(tmp_path / "empty")]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--proj_precondition" in err and not (out / "metadata.json").exists()


def test_full_grads_refuses_bad_flags_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import hf_gradext.projection.full_grads as full_grads

    def never(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(full_grads, "run_full_grads", never)
    base = [*MODEL, "--max_samples", "2", "--output_dir", str(tmp_path / "fg")]
    (tmp_path / "empty").mkdir()
    for extra, needle in [
        (["--proj_precondition", str(tmp_path / "nowhere")], "no such file"),
        (["--proj_precondition", str(tmp_path / "empty")], "optimizer.pt"),
        (["--proj_precondition_power", "0"], "must be > 0"),
        (["--proj_precondition_power", "nan"], "must be > 0"),
    ]:
        assert full_grads_main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "--proj_precondition" in err and needle in err, err


def test_training_with_the_flag_is_refused(run_dir):
    text = _one_line_error(
        lambda: ProjectionArguments(
            project_gradients=True, proj_precondition=str(run_dir)
        )._validate_projection()
    )
    assert "--project_gradients" in text


def test_resume_with_other_preconditioning_is_refused(run_dir, tmp_path, capsys):
    out = tmp_path / "p"
    argv = [*MODEL, *PROJ, "--output_dir", str(out), "--batch_size", "2"]
    assert project_main([*argv, "--max_samples", "2"]) == 0
    capsys.readouterr()
    assert project_main([*argv, "--max_samples", "4", "--resume", "--proj_precondition", str(run_dir)]) == 2
    assert "preconditioning" in capsys.readouterr().err
    assert _project(tmp_path / "q", run_dir, "rank1", "--max_samples", "2") == 0
    capsys.readouterr()
    assert _project(tmp_path / "q", run_dir, "adafactor", "--max_samples", "4", "--resume") == 2
    assert "preconditioning" in capsys.readouterr().err


def test_attribute_across_other_preconditioning_is_refused(run_dir, plain_dir, tmp_path, capsys):
    pre = tmp_path / "pre"
    assert _project(pre, run_dir, "rank1") == 0
    capsys.readouterr()
    for train, query in ((pre, plain_dir), (plain_dir, pre)):
        argv = ["--train", str(train), "--query", str(query), "--output", str(tmp_path / "a")]
        assert attribute_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "--proj_precondition" in err
    # The same preconditioning on both sides is accepted.
    assert attribute_main(["--train", str(pre), "--query", str(pre), "--output", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["results"]
