"""Shared fixtures: offline mode, an isolated tokenizer cache, tiny GPT-2 models and tokenizers.

Environment is set at import time (before transformers/datasets are imported by any test), and
subprocesses inherit it: nothing in the suite can reach the Hub, and the locally trained tokenizer
is cached per test session instead of in the user's cache.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread: the 2-core machines run several processes at once, and torch's OpenMP pool
# oversubscribed by other processes ran 5-20x slower in practice (measured: 0.29 s vs 1.3-7 s per step).
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "HF_GRADEXT_CACHE" not in os.environ:
    os.environ["HF_GRADEXT_CACHE"] = tempfile.mkdtemp(prefix="hf_gradext_test_cache_")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"] or 1)))

from tests.helpers import make_tiny_gpt2  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The embedded-corpus byte-level BPE tokenizer (``PreTrainedTokenizerFast``, eos/pad set)."""
    from hf_gradext.data import build_embedded_tokenizer

    return build_embedded_tokenizer()


@pytest.fixture
def tiny_gpt2_config():
    """A 2-layer, 32-wide GPT-2 config (vocab 97, 64 positions, dropout off)."""
    return make_tiny_gpt2().config


@pytest.fixture
def tiny_gpt2():
    """A fresh deterministic tiny ``GPT2LMHeadModel`` (tied embeddings, seed 0)."""
    return make_tiny_gpt2()


@pytest.fixture(scope="session")
def saved_model_dir(tmp_path_factory, tiny_tokenizer):
    """A local directory with a tiny GPT-2 and the embedded tokenizer, written by ``save_pretrained``.

    Stands in for a Hub id: ``from_pretrained(saved_model_dir)`` goes through the same code path.
    """
    path = tmp_path_factory.mktemp("saved_tiny_gpt2")
    model = make_tiny_gpt2(
        vocab_size=len(tiny_tokenizer),
        n_positions=128,
        eos_token_id=tiny_tokenizer.eos_token_id,
        bos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path
