"""Tokenizers: a Hub/local one through ``AutoTokenizer``, or a byte-level BPE built locally.

The local tokenizer is trained with ``tokenizers`` on the embedded corpus (about a second), saved
with ``save_pretrained`` into a cache directory keyed by the corpus hash and the vocabulary size,
and loaded from there afterwards. The directory is written under a temporary name and renamed when
complete, so concurrent ranks or a killed run never leave a half-written tokenizer behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hf_gradext.arguments.model import hub_kwargs
from hf_gradext.data.corpus import embedded_corpus_hash, embedded_documents
from hf_gradext.errors import UserFacingError
from hf_gradext.hub import load_pretrained
from hf_gradext.store.cache_dir import cache_root, private_dir

__all__ = ["build_embedded_tokenizer", "cache_root", "load_tokenizer"]

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
DEFAULT_VOCAB_SIZE = 2048
# Part of the cache key: bump when the recipe below changes.
TOKENIZER_VERSION = 1


def _train_bpe(vocab_size: int) -> Any:
    """Train a GPT-2 style byte-level BPE on the embedded corpus; returns a ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        # All 256 bytes stay in the vocabulary, so any text (not only the corpus) can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(embedded_documents(), trainer=trainer)
    return tok


def build_embedded_tokenizer(
    vocab_size: int = DEFAULT_VOCAB_SIZE, cache_dir: str | os.PathLike | None = None
):
    """Return the local byte-level BPE tokenizer as a ``PreTrainedTokenizerFast`` (eos, bos, unk, pad set).

    Args:
        vocab_size: target vocabulary size (special tokens and the 256 byte symbols included).
        cache_dir: cache root; defaults to the private per-user cache (:func:`cache_root`, mode 0700).
    """
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise UserFacingError(
            f"tokenizer vocab_size={vocab_size} is too small; use at least 300 (256 bytes + merges)"
        )
    root = Path(cache_dir) if cache_dir is not None else private_dir()
    target = root / "tokenizers" / f"bpe-v{TOKENIZER_VERSION}-{embedded_corpus_hash()}-{vocab_size}"
    if (target / "tokenizer.json").is_file():
        try:
            return PreTrainedTokenizerFast.from_pretrained(str(target))
        except Exception as exc:  # a damaged cache entry (truncated, flipped bytes): build it again
            logger.warning(
                "cached tokenizer %s is unreadable (%s): rebuilding it", target, type(exc).__name__
            )
            shutil.rmtree(target, ignore_errors=True)
    if not (target / "tokenizer.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            fast = _wrap(_train_bpe(vocab_size))
            fast.save_pretrained(str(tmp))
            try:
                os.replace(tmp, target)
            except OSError:
                # Another process finished first: its copy is as good as ours.
                if not (target / "tokenizer.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("built byte-level BPE tokenizer (vocab %d) in %s", vocab_size, target)
    return PreTrainedTokenizerFast.from_pretrained(str(target))


def _wrap(tok: Any):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # Positions are limited by the model, not by this tokenizer; block_size is resolved from the model.
        model_max_length=1024,
    )


def load_tokenizer(args: Any):
    """The tokenizer a run uses: ``--tokenizer_name``, else ``--model_name_or_path``'s, else the local BPE.

    A tokenizer without a pad token gets its eos token as pad (GPT-2 has none), so padded batches work.
    Raises:
        UserFacingError: the named tokenizer is neither a local directory nor fetchable from the Hub nor
            cached (see :mod:`hf_gradext.hub`).
    """
    from transformers import AutoTokenizer

    name = getattr(args, "tokenizer_name", None) or getattr(args, "model_name_or_path", None)
    if name is None:
        if getattr(args, "dataset_name", None) or getattr(args, "train_file", None):
            logger.warning(
                "no --tokenizer_name or --model_name_or_path: using the local BPE tokenizer trained on the "
                "embedded corpus; pass --tokenizer_name for a tokenizer suited to your data"
            )
        return build_embedded_tokenizer(getattr(args, "tokenizer_vocab_size", DEFAULT_VOCAB_SIZE))
    flag = "--tokenizer_name" if getattr(args, "tokenizer_name", None) else "--model_name_or_path"
    tokenizer = load_pretrained(
        AutoTokenizer.from_pretrained, name, flag=flag, what="tokenizer", **hub_kwargs(args)
    )
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
