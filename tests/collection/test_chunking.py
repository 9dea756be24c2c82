import pytest

from hf_gradext.collection.chunking import MIB, chunk_size_for, chunks, dense_param_bytes
from hf_gradext.errors import UserFacingError


def test_chunk_size_fits_budget_and_honours_request():
    assert chunk_size_for(10, 100) == 10
    assert chunk_size_for(10, 100, requested=3) == 3
    assert chunk_size_for(10, 100, requested=50) == 10  # the budget wins
    assert chunk_size_for(0, 100) > 1_000_000  # nothing dense to materialize (sparse embeddings)


def test_chunk_size_error_names_the_flag():
    with pytest.raises(UserFacingError, match="--gradient_collection_memory_budget_mb"):
        chunk_size_for(2 * MIB, MIB)


@pytest.mark.parametrize(("n", "size"), [(0, 3), (1, 3), (7, 3), (6, 3), (5, 100)])
def test_chunks_cover_range_once(n, size):
    parts = chunks(n, size)
    covered = [i for sl in parts for i in range(sl.start, sl.stop)]
    assert covered == list(range(n))
    assert all(sl.stop - sl.start <= size for sl in parts)


def test_dense_param_bytes_counts_own_trainable_params():
    import torch

    lin = torch.nn.Linear(3, 4)
    assert dense_param_bytes(lin, 4) == (12 + 4) * 4
    lin.bias.requires_grad_(False)
    assert dense_param_bytes(lin, 2) == 12 * 2
