import torch

from hf_gradext.projection.attribution import second_moment, top_k_attribution


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
