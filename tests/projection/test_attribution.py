import pytest
import torch

from hf_gradext.errors import UserFacingError
from hf_gradext.projection import KroneckerProjector
from hf_gradext.projection.attribution import second_moment, top_k_attribution
from hf_gradext.projection.preconditioning import AdamPreconditioner
from tests.projection.conftest import make_batch, make_tiny_gpt2, oracle_grads


def _blocks(x, size):
    def gen():
        for s in range(0, x.shape[0], size):
            yield x[s : s + size], [{"example_id": i} for i in range(s, min(s + size, x.shape[0]))]

    return gen


def test_streamed_top_k_equals_brute_force():
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(23, 5, generator=gen, dtype=torch.float64)
    queries = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    for kind in ("dot", "cosine"):
        scores, index = top_k_attribution(_blocks(train, 6), queries, top_k=3, kind=kind)
        if kind == "cosine":
            full = (queries / queries.norm(dim=1, keepdim=True)) @ (train / train.norm(dim=1, keepdim=True)).T
        else:
            full = queries @ train.T
        ref_scores, ref_idx = full.topk(3, dim=1)
        torch.testing.assert_close(scores, ref_scores)
        assert [[m["example_id"] for m in row] for row in index] == ref_idx.tolist()


def test_damped_preconditioner_matches_dense_formula():
    gen = torch.Generator().manual_seed(1)
    train = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    q = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    scores, index = top_k_attribution(_blocks(train, 7), q, top_k=30, kind="dot", damping=0.5)
    f = train.T @ train / 30
    m = torch.linalg.inv(f + 0.5 * f.diagonal().mean() * torch.eye(4, dtype=torch.float64))
    full = q @ m @ train.T  # (2, 30)
    for row in range(2):
        ids = [e["example_id"] for e in index[row]]
        torch.testing.assert_close(scores[row], full[row, ids])
        assert scores[row].tolist() == sorted(scores[row].tolist(), reverse=True)
    f2, n = second_moment(_blocks(train, 7), "dot")
    torch.testing.assert_close(f2, f) and n == 30


def test_top_k_larger_than_training_set():
    scores, index = top_k_attribution(_blocks(torch.eye(3), 2), torch.ones(1, 3), top_k=10, kind="dot")
    assert scores.shape == (1, 3) and len(index[0]) == 3


# ---------------------------------------------------------------------- Adam preconditioning (LESS-style)


def _trained_with_trainer(tmp_path, steps=3):
    """A tiny GPT-2 trained a few steps by transformers.Trainer, which saves checkpoint-N/optimizer.pt."""
    from transformers import Trainer, TrainingArguments

    model = make_tiny_gpt2(dtype=torch.float32)
    model.train()
    batch = make_batch(lengths=(7, 7, 7, 7), seq=7, seed=4)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2,
        weight_decay=0.1, save_strategy="steps", save_steps=steps, report_to=[], use_cpu=True,
        disable_tqdm=True, logging_steps=100, dataloader_pin_memory=False,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    return model, trainer.optimizer, tmp_path / f"checkpoint-{steps}"


def test_adam_preconditioner_reads_a_trainer_checkpoint_like_the_live_optimizer(tmp_path):
    model, optimizer, ckpt = _trained_with_trainer(tmp_path)
    from_ckpt = AdamPreconditioner.from_checkpoint(ckpt, model)
    live = AdamPreconditioner.from_optimizer(optimizer, model)
    weights = {n for n, p in model.named_parameters() if p.dim() == 2}
    assert set(from_ckpt.second_moments) == set(live.second_moments) == weights
    beta2, eps = optimizer.param_groups[0]["betas"][1], optimizer.param_groups[0]["eps"]
    for name, p in model.named_parameters():
        if p.dim() != 2:
            continue
        state = optimizer.state[p]
        v_hat = state["exp_avg_sq"].double() / (1 - beta2 ** float(state["step"]))
        torch.testing.assert_close(from_ckpt.scale(name), 1 / (v_hat.sqrt() + eps))
        torch.testing.assert_close(from_ckpt.scale(name), live.scale(name))
    # A model whose parameters do not fit the saved state is refused, naming the mismatch.
    with pytest.raises(UserFacingError, match="does not match"):
        AdamPreconditioner.from_checkpoint(ckpt, make_tiny_gpt2(tie=False, dtype=torch.float32))
    with pytest.raises(UserFacingError, match="optimizer.pt"):
        AdamPreconditioner.from_checkpoint(tmp_path / "nowhere", model)


def _random_preconditioner(model, seed=0, power=1.0, rank_one=False):
    gen = torch.Generator().manual_seed(seed)
    moments = {}
    for name, p in model.named_parameters():
        if p.dim() == 2:
            if rank_one:
                a = torch.rand(p.shape[0], generator=gen, dtype=torch.float64) + 0.1
                b = torch.rand(p.shape[1], generator=gen, dtype=torch.float64) + 0.1
                moments[name] = torch.outer(a, b) * 1e-4
            else:
                moments[name] = torch.rand(*p.shape, generator=gen, dtype=torch.float64) ** 4 * 1e-4
    return AdamPreconditioner(moments, eps=1e-8, power=power)


@pytest.mark.parametrize("mode", ["rank1", "adafactor"])
def test_folded_factors_project_the_factored_preconditioned_gradient_exactly(mode):
    """fold_into's rows (factored path, no gradient built) == naive projection of outer(u, w) * G."""
    model, batch = make_tiny_gpt2(), make_batch()
    proj = KroneckerProjector(model, layers="all", rank_total=16, rank_min=2, include_embeddings=True)
    pre = _random_preconditioner(model)
    folded = pre.fold_into(proj, mode)
    names = sorted({b.weight_name for b in proj.blocks})
    exact = oracle_grads(model, batch, names)
    factored = {n: exact[n] * torch.outer(*pre.factored(n, mode)) for n in names}
    ref = proj.naive_project(factored)
    assert float((folded.project(batch) - ref).abs().max() / ref.abs().max()) <= 1e-10
    # The original projector is untouched, and the elementwise (exact) path is s * G then projection.
    assert float((proj.project(batch) - proj.naive_project(exact)).abs().max()) <= 1e-10 * float(
        proj.naive_project(exact).abs().max()
    )
    scaled = pre.apply(exact)
    for n in names:
        torch.testing.assert_close(scaled[n], exact[n] / (pre.second_moments[n].sqrt() + pre.eps))


@pytest.mark.parametrize("mode", ["rank1", "adafactor"])
def test_factored_scale_is_exact_for_a_rank_one_second_moment(mode):
    model = make_tiny_gpt2()
    pre = _random_preconditioner(model, rank_one=True, power=0.5)
    pre.eps = 0.0  # (sqrt(v) + eps)^-p is separable exactly when eps = 0 and v is rank one
    assert max(pre.factor_error(mode).values()) < 1e-10
    general = _random_preconditioner(model, seed=1)
    errors = general.factor_error(mode)
    assert all(0 < e < 1 for e in errors.values())  # an approximation: better than zero, not exact
