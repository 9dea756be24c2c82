"""``hf-gradext project --streaming`` and ``--max_samples`` before tokenization (issue #14, item 3).

The oracle is the non-streaming pass: the same blocks, example ids and projected rows, whether the split
is streamed, cut by ``--max_samples`` before tokenizing, resumed after a kill, or shared between ranks.
"""

from __future__ import annotations

import json
import os
import random
from types import SimpleNamespace

import pytest
import torch

import hf_gradext.data.blocks as blocks_module
import hf_gradext.data.streaming as streaming_module
import hf_gradext.projection.dataset_pass as dataset_pass
from hf_gradext.data import build_datasets
from hf_gradext.data.blocks import CHUNK_DOCUMENTS
from hf_gradext.data.streaming import BlockStream, arrow_source, streaming_source
from hf_gradext.errors import UserFacingError
from hf_gradext.projection import load_projections
from hf_gradext.projection.cli import project_main

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "ran",
    "sat",
    "on",
    "mat",
    "park",
    "ball",
    "red",
    "blue",
    "happy",
    "sad",
    "Lily",
    "Tom",
    "went",
    "home",
    "and",
]
BLOCK = 16
MODEL = ["--config_overrides", "n_layer=1,n_embd=16,n_head=2", "--block_size", str(BLOCK), "--seed", "3"]
PROJ = ["--proj_rank_total", "8", "--proj_rank_min", "2", "--proj_dtype", "float32"]
RUN = ["--device", "cpu", "--disable_tqdm", "--batch_size", "16"]


def _write_docs(path, n_docs: int, seed: int = 0, max_words: int = 12) -> str:
    """``n_docs`` lines of random words (some empty), so chunk remainders differ from chunk to chunk."""
    rng = random.Random(seed)
    lines = (" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, max_words))) for _ in range(n_docs))
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """3.5 chunks of documents: 4 grouping runs, the last one partial."""
    return _write_docs(tmp_path_factory.mktemp("docs") / "docs.txt", 3 * CHUNK_DOCUMENTS + 500)


@pytest.fixture(scope="module")
def small_docs(tmp_path_factory):
    """Two grouping runs of short documents: about 110 blocks of 16 tokens, projected in seconds."""
    return _write_docs(tmp_path_factory.mktemp("small") / "small.txt", 1200, seed=1, max_words=3)


def _margs(train_file: str, pct: int = 5, **extra):
    return SimpleNamespace(
        train_file=train_file,
        validation_split_percentage=pct,
        keep_linebreaks=True,
        block_size=BLOCK,
        **extra,
    )


def _as_lists(dataset) -> list[tuple[int, list[int], list[int]]]:
    return [
        (int(e), list(i), list(lab))
        for e, i, lab in zip(dataset["example_id"], dataset["input_ids"], dataset["labels"])
    ]


def _stream_lists(stream) -> list[tuple[int, list[int], list[int]]]:
    return [(b["example_id"], b["input_ids"], b["labels"]) for b in stream]


# ------------------------------------------------------------------ blocks: the same as tokenize_and_group
def test_small_streaming_reads_give_the_same_blocks(docs, tiny_tokenizer, monkeypatch):
    """The text file read 4 KiB at a time (about 30 reads, most ending mid-file) gives the same blocks."""
    assert os.path.getsize(docs) > 10 * 4096
    margs = _margs(docs, 5)
    train, _ = build_datasets(margs, tiny_tokenizer, block_size=BLOCK)
    monkeypatch.setattr(streaming_module, "STREAM_READ_BYTES", 4096)
    stream = BlockStream(streaming_source(margs, "train"), tiny_tokenizer, BLOCK)
    assert _stream_lists(stream) == _as_lists(train)


@pytest.mark.parametrize("pct,split", [(5, "train"), (5, "validation"), (0, "train")])
@pytest.mark.parametrize("make_source", [arrow_source, streaming_source], ids=["arrow", "streaming"])
def test_lazy_blocks_equal_the_full_tokenization(docs, tiny_tokenizer, make_source, pct, split):
    margs = _margs(docs, pct)
    train, validation = build_datasets(margs, tiny_tokenizer, block_size=BLOCK)
    reference = _as_lists(train if split == "train" else validation)
    stream = BlockStream(make_source(margs, split), tiny_tokenizer, BLOCK, split_name=split)
    assert _stream_lists(stream) == reference
    capped = BlockStream(make_source(margs, split), tiny_tokenizer, BLOCK, max_blocks=len(reference) // 2)
    assert _stream_lists(capped) == reference[: len(reference) // 2]  # = tokenize all, then select first N


@pytest.mark.parametrize("read_bytes", [None, 4096], ids=["default_reads", "4KiB_reads"])
def test_streamed_jsonl_gives_the_blocks_of_the_loaded_file(
    tmp_path, tiny_tokenizer, monkeypatch, read_bytes
):
    if read_bytes is not None:  # many reads, each ending inside the file: documents must not change
        monkeypatch.setattr(streaming_module, "STREAM_READ_BYTES", read_bytes)
    rng = random.Random(2)
    rows = [
        {"id": i, "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9)))} for i in range(2100)
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    margs = _margs(str(path), 0)
    train, _ = build_datasets(margs, tiny_tokenizer, block_size=BLOCK)
    assert _stream_lists(BlockStream(streaming_source(margs, "train"), tiny_tokenizer, BLOCK)) == _as_lists(
        train
    )


@pytest.fixture
def tokenized_chunks(monkeypatch) -> list[int]:
    """The number of documents of each tokenize_documents call, in order (tokenization still runs)."""
    seen: list[int] = []
    original = blocks_module.tokenize_documents
    monkeypatch.setattr(
        blocks_module,
        "tokenize_documents",
        lambda texts, tok: seen.append(len(texts)) or original(texts, tok),
    )
    return seen


def test_max_samples_reads_and_tokenizes_only_the_first_chunk(docs, tiny_tokenizer, tokenized_chunks):
    seen = tokenized_chunks
    for make_source in (arrow_source, streaming_source):
        seen.clear()
        stream = BlockStream(make_source(_margs(docs, 0), "train"), tiny_tokenizer, BLOCK, max_blocks=5)
        assert len(list(stream)) == 5
        assert stream.documents_read == CHUNK_DOCUMENTS and seen == [CHUNK_DOCUMENTS]  # of 3500


def test_too_little_data_is_one_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "tiny.txt"
    path.write_text("a cat\n")
    stream = BlockStream(streaming_source(_margs(str(path), 0), "train"), tiny_tokenizer, 4096)
    with pytest.raises(UserFacingError, match="fewer tokens than one block of --block_size 4096"):
        list(stream)


# ------------------------------------------------------------------ ranks: the same share as todo[rank::world]
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_rank_takes_the_same_examples_streamed_or_not(docs, tiny_tokenizer, world):
    margs = _margs(docs, 0)
    train, _ = build_datasets(margs, tiny_tokenizer, block_size=BLOCK)
    done = {0, 1, 5, 17, 18, 200}
    for rank in range(world):
        full = dataset_pass._plan_work(train, done, rank, world, batch_size=7)
        stream = BlockStream(streaming_source(margs, "train"), tiny_tokenizer, BLOCK)
        lazy = dataset_pass._plan_work(stream, done, rank, world, batch_size=7)
        want = [(b["example_id"], b["input_ids"]) for b in full.batches]
        got = [(b["example_id"], b["input_ids"]) for b in lazy.batches]
        assert got == want and lazy.skipped() == full.skipped() == len(done)
        # A local text stream has no document count in its metadata: no estimate until one is known.
        assert lazy.total is None and stream.source.length is None and lazy.estimate(10) is None
        stream.source.length = 7000  # as a Hub dataset's card would give it
        assert lazy.estimate(10) == round(10 * 7000 / 3500)
        capped = BlockStream(streaming_source(margs, "train"), tiny_tokenizer, BLOCK, max_blocks=100)
        work = dataset_pass._plan_work(capped, done, rank, world, batch_size=7)
        assert work.total == sum(len(b["example_id"]) for b in work.batches) == len(range(rank, 95, world))


# ------------------------------------------------------------------ end to end: rows equal
def _project(out, train_file, *extra):
    return project_main([*MODEL, *PROJ, *RUN, "--train_file", train_file, "--output_dir", str(out), *extra])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, small_docs):
    """The reference: the non-streaming pass over the whole split (datasets.map tokenization)."""
    out = tmp_path_factory.mktemp("full")
    assert _project(out, small_docs) == 0
    return load_projections(out)


@pytest.mark.parametrize(
    "extra", [["--streaming"], ["--streaming", "--max_samples", "40"], ["--max_samples", "40"]]
)
def test_streamed_and_capped_rows_equal_the_full_pass(full_run, small_docs, tmp_path, extra):
    rows, ids, _ = full_run
    assert len(ids) > 80  # two grouping runs
    assert _project(tmp_path, small_docs, *extra) == 0
    got, got_ids, _ = load_projections(tmp_path)
    n = len(got_ids)
    assert got_ids == ids[:n] and n == (40 if "--max_samples" in extra else len(ids))
    torch.testing.assert_close(got, rows[:n], rtol=1e-4, atol=1e-6)


def test_max_samples_does_not_tokenize_the_whole_file(docs, tmp_path, tokenized_chunks):
    seen = tokenized_chunks
    for mode in ([], ["--streaming"]):
        seen.clear()
        assert _project(tmp_path / f"m{len(mode)}", docs, "--max_samples", "6", *mode) == 0
        assert sum(seen) == CHUNK_DOCUMENTS  # of the 3325 training documents


class _Killed(Exception):
    pass


def test_killed_streaming_run_resumes_without_duplicates_or_gaps(full_run, small_docs, tmp_path, monkeypatch):
    rows, ids, _ = full_run

    def kill(code):  # the test hook's os._exit, as an exception: the writer is left unclosed, as by a kill
        raise _Killed(code)

    args = ("--streaming", "--batch_size", "8", "--proj_save_interval", "1")
    monkeypatch.setenv(dataset_pass.KILL_ENV, "3")
    monkeypatch.setattr(dataset_pass.os, "_exit", kill)
    with pytest.raises(_Killed):
        _project(tmp_path, small_docs, *args)
    monkeypatch.undo()
    _, partial, _ = load_projections(tmp_path)
    assert partial == list(range(24))
    assert _project(tmp_path, small_docs, *args, "--resume") == 0
    got, got_ids, _ = load_projections(tmp_path)
    assert got_ids == ids  # no duplicate, no gap
    torch.testing.assert_close(got, rows, rtol=1e-4, atol=1e-6)
    stats = json.loads((tmp_path / "projection_stats.json").read_text())
    assert stats["skipped_already_done"] == 24 and stats["examples_this_run"] == len(ids) - 24


# ------------------------------------------------------------------ refusals, before the model loads
@pytest.fixture
def no_model(monkeypatch):
    def too_late(*args, **kwargs):
        raise AssertionError("the model was loaded before the streaming flags were checked")

    monkeypatch.setattr(dataset_pass, "load_model_for_pass", too_late)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_streaming_with_workers_is_refused(small_docs, tmp_path, capsys, no_model):
    assert _project(tmp_path, small_docs, "--streaming", "--preprocessing_num_workers", "2") == 2
    line = _one_error_line(capsys)
    assert "--streaming" in line and "drop --preprocessing_num_workers" in line


def test_streaming_validation_without_one_is_refused(small_docs, tmp_path, capsys, no_model):
    argv = ("--streaming", "--split", "validation", "--validation_split_percentage", "0")
    assert _project(tmp_path, small_docs, *argv) == 2
    assert "--split validation" in _one_error_line(capsys)


def test_streaming_holdout_of_an_unsized_hub_dataset_is_refused(
    small_docs, tmp_path, capsys, monkeypatch, no_model
):
    import hf_gradext.data.streaming as streaming

    real = streaming._open_streams

    def as_if_remote(margs):  # a Hub dataset without a document count in its metadata
        streams, _, _ = real(margs)
        return streams, "--dataset_name 'someone/unsized'", False

    monkeypatch.setattr(streaming, "_open_streams", as_if_remote)
    # An earlier non-streaming load of the same file leaves its split sizes in datasets' cache; a Hub
    # dataset without them is what this case is about.
    monkeypatch.setattr(streaming, "_metadata_length", lambda stream: None)
    assert _project(tmp_path, small_docs, "--streaming") == 2
    line = _one_error_line(capsys)
    assert "--validation_split_percentage 5" in line and "pass --validation_split_percentage 0" in line
    with pytest.raises(AssertionError, match="the model was loaded"):  # without the hold-out: accepted
        _project(tmp_path / "p0", small_docs, "--streaming", "--validation_split_percentage", "0")
