import types

import pytest

from hf_gradext.data import tokenizer as tok_mod
from hf_gradext.data.corpus import embedded_documents
from hf_gradext.errors import UserFacingError


def test_embedded_tokenizer_special_tokens_and_roundtrip(tiny_tokenizer):
    assert tiny_tokenizer.eos_token == tok_mod.EOS_TOKEN
    assert tiny_tokenizer.pad_token == tok_mod.PAD_TOKEN
    assert tiny_tokenizer.eos_token_id != tiny_tokenizer.pad_token_id
    assert 300 <= len(tiny_tokenizer) <= tok_mod.DEFAULT_VOCAB_SIZE
    for text in [embedded_documents()[0], "Unseen bytes: Zürich, 東京, emoji 🙂 and tabs\t!"]:
        ids = tiny_tokenizer(text)["input_ids"]
        assert tiny_tokenizer.decode(ids) == text


def test_embedded_tokenizer_compresses_the_corpus(tiny_tokenizer):
    doc = " ".join(embedded_documents()[:50])
    assert len(doc) / len(tiny_tokenizer(doc)["input_ids"]) > 3.0  # real merges, not bytes


def test_tokenizer_is_cached_by_corpus_and_vocab(tmp_path, monkeypatch):
    first = tok_mod.build_embedded_tokenizer(vocab_size=512, cache_dir=tmp_path)
    calls = []
    real = tok_mod._train_bpe
    monkeypatch.setattr(tok_mod, "_train_bpe", lambda v: calls.append(v) or real(v))
    again = tok_mod.build_embedded_tokenizer(vocab_size=512, cache_dir=tmp_path)
    assert calls == []  # served from the cache
    assert again.get_vocab() == first.get_vocab()
    tok_mod.build_embedded_tokenizer(vocab_size=600, cache_dir=tmp_path)
    assert calls == [600]  # a different key trains again
    entries = sorted(p.name for p in (tmp_path / "tokenizers").iterdir())
    assert len(entries) == 2 and not any(e.startswith(".") for e in entries)  # no temp dirs left


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_GRADEXT_CACHE", str(tmp_path))
    assert tok_mod.cache_root() == tmp_path
    monkeypatch.delenv("HF_GRADEXT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tok_mod.cache_root() == tmp_path / "xdg" / "hf_gradext"


def test_too_small_vocab_is_an_error(tmp_path):
    with pytest.raises(UserFacingError, match="vocab_size"):
        tok_mod.build_embedded_tokenizer(vocab_size=10, cache_dir=tmp_path)


def test_load_tokenizer_sources(saved_model_dir, tiny_tokenizer):
    default = tok_mod.load_tokenizer(types.SimpleNamespace())
    assert default.get_vocab() == tiny_tokenizer.get_vocab()
    from_dir = tok_mod.load_tokenizer(types.SimpleNamespace(model_name_or_path=str(saved_model_dir)))
    assert from_dir.get_vocab() == tiny_tokenizer.get_vocab()
    assert from_dir.pad_token_id == tiny_tokenizer.pad_token_id


def test_load_tokenizer_unknown_hub_id_is_one_line_error():
    with pytest.raises(UserFacingError) as info:
        tok_mod.load_tokenizer(types.SimpleNamespace(tokenizer_name="no-such-org/no-such-tokenizer"))
    msg = str(info.value)
    assert "\n" not in msg and "--tokenizer_name" in msg and "no-such-org/no-such-tokenizer" in msg
    assert "local directory" in msg
