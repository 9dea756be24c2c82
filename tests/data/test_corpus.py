import re

from hf_gradext.data import corpus
from hf_gradext.data.corpus import embedded_corpus_hash, embedded_corpus_text, generate_documents


def test_generation_is_deterministic_and_seeded():
    assert generate_documents(50, seed=7) == generate_documents(50, seed=7)
    assert generate_documents(50, seed=7) != generate_documents(50, seed=8)


def test_embedded_corpus_size_and_shape():
    text = embedded_corpus_text()
    docs = text.rstrip("\n").split("\n")
    assert len(docs) == corpus.DEFAULT_NUM_DOCUMENTS
    # "Several hundred KB of varied English-like text".
    assert 300_000 < len(text.encode()) < 1_500_000
    assert all(d and "\n" not in d for d in docs)
    assert len(set(docs)) > 0.95 * len(docs)  # varied, not one template repeated


def test_every_genre_appears_and_text_is_english_like():
    text = embedded_corpus_text()
    for marker in ("Once upon a time", '" asked', "is an animal", " plus ", "How to make"):
        assert marker in text
    words = re.findall(r"[A-Za-z]+", text)
    assert len(set(w.lower() for w in words)) > 300
    # Pronoun agreement: a story's subject pronoun never mixes within the "loved to" sentence.
    assert "She loved to" in text and "He loved to" in text


def test_hash_changes_with_content(monkeypatch):
    h = embedded_corpus_hash()
    assert re.fullmatch(r"[0-9a-f]{16}", h)
    monkeypatch.setattr(corpus, "CORPUS_VERSION", corpus.CORPUS_VERSION + 1)
    assert embedded_corpus_hash() != h
