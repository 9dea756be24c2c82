import pytest
from datasets import Dataset

from hf_gradext.data.blocks import EXAMPLE_ID_COLUMN, group_texts, text_column, tokenize_and_group
from hf_gradext.errors import UserFacingError


def test_group_texts_matches_a_plain_loop():
    examples = {
        "input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]],
        "attention_mask": [[1] * 3, [1] * 2, [1] * 5],
    }
    out = group_texts(examples, block_size=4)
    flat = [t for ids in examples["input_ids"] for t in ids]
    expected = [flat[i : i + 4] for i in range(0, len(flat) - len(flat) % 4, 4)]
    assert out["input_ids"] == expected
    assert out["labels"] == expected
    assert out["attention_mask"] == [[1] * 4] * len(expected)


def test_text_column_choice():
    ds = Dataset.from_dict({"id": [1], "text": ["a"]})
    assert text_column(ds) == "text"
    assert text_column(Dataset.from_dict({"body": ["a"], "x": [1]})) == "body"
    with pytest.raises(UserFacingError, match="--text_column"):
        text_column(ds, "missing")


def test_tokenize_and_group_appends_eos_and_numbers_blocks(tiny_tokenizer):
    texts = ["Once upon a time there was a cat.", "The dog ran to the park.", "Lily had a red ball."]
    blocks = tokenize_and_group(Dataset.from_dict({"text": texts}), tiny_tokenizer, block_size=5)
    eos = tiny_tokenizer.eos_token_id
    stream = []
    for t in texts:
        stream += tiny_tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]
    n = len(stream) // 5
    assert len(blocks) == n
    assert [row for row in blocks["input_ids"]] == [stream[i * 5 : (i + 1) * 5] for i in range(n)]
    assert blocks["labels"] == blocks["input_ids"]
    assert blocks[EXAMPLE_ID_COLUMN] == list(range(n))
    # No all-ones attention_mask: blocks are never padded, and the mask would cost an sdpa host sync.
    assert set(blocks.column_names) == {"input_ids", "labels", EXAMPLE_ID_COLUMN}


def test_max_samples_and_too_little_data(tiny_tokenizer):
    ds = Dataset.from_dict({"text": ["word " * 50]})
    blocks = tokenize_and_group(ds, tiny_tokenizer, block_size=4, max_samples=3)
    assert blocks[EXAMPLE_ID_COLUMN] == [0, 1, 2]
    with pytest.raises(UserFacingError, match="--block_size 4096"):
        tokenize_and_group(ds, tiny_tokenizer, block_size=4096, split_name="train")
    with pytest.raises(UserFacingError, match=">= 1"):
        tokenize_and_group(ds, tiny_tokenizer, block_size=0)


def test_tokenizing_keeps_no_memory_per_document(tiny_tokenizer):
    """A long pass tokenizes millions of documents: nothing may stay allocated per document.

    tokenizers 0.23.1 kept 64 bytes of Python memory per encoded text, never freed (about 60 MiB over the
    million documents of bench_project_memory.py); the floor is 0.23.2. tracemalloc counts the Python
    allocations still alive after the calls (exact, no timing).
    """
    import gc
    import tracemalloc

    from hf_gradext.data.blocks import tokenize_documents

    texts = [f"document {i} about the cat and the dog" for i in range(500)]
    tokenize_documents(texts, tiny_tokenizer)  # warm-up: one-off caches
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(20):
            tokenize_documents(texts, tiny_tokenizer)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    kept = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    per_document = kept / (20 * len(texts))
    assert per_document < 1.0, f"{per_document:.1f} bytes kept per tokenized document"
