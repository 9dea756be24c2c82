"""Integrity of files at rest: checksums, and one-line errors for a file that is damaged.

Checksum written by this version: ``"xxh3:<32 hex digits>"``, XXH3-128 of the bytes (the ``xxhash``
package, which ``datasets`` already installs). One pass at memory speed (26.6 GiB/s on one core of the
2-core CPU box, 6 MiB hashed in 256 KiB slices, against 4.7 GiB/s for ``zlib.crc32``), with almost no cost
per call, so a shard writer hashes each slice right after writing it (:func:`new_hasher`). A random change
anywhere is missed with probability ``2**-128``; it guards against damage (disk, transfer, stray writes),
not against an adversary.

Files written by earlier versions still verify, by the prefix of their record (:func:`checksum_matches`):
``"fl64:..."`` (a block-wise Fletcher-64 pair over little-endian 64-bit words in 32 KiB blocks,
``s1 = sum_j b_j + n_bytes``, ``s2 = sum_j j * b_j`` mod 2**64, ``b_j`` the word sum of block ``j``, a last
partial block zero-padded; written by 0.2.0 until 2026-12-04) and ``"crc32:xxxxxxxx"`` (``zlib.crc32``).

Readers raise :class:`DamagedFileError`: one line naming the file, what is wrong with it, and what to do.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from hf_gradext.errors import UserFacingError

ALGORITHM = "xxh3"
FLETCHER_ALGORITHM = "fl64"  # verification only (files of earlier versions)
LEGACY_ALGORITHM = "crc32"  # verification only
_CHUNK = 16 * 1024 * 1024
_BLOCK_WORDS = 4096  # 32 KiB blocks: the unit whose order s2 checks
_BLOCK_BYTES = 8 * _BLOCK_WORDS
_MASK = (1 << 64) - 1
_WORDS = np.dtype("<u8")  # little-endian on every machine: a file verifies wherever it is read
_INDEX = np.arange(1, 65, dtype=np.uint64)  # 1-based block numbers within one update, reused


class DamagedFileError(UserFacingError):
    """A file on disk is truncated, unparsable or fails its checksum; the message names it and the fix."""


def damaged(path: str | os.PathLike, reason: str, fix: str) -> DamagedFileError:
    """The one-line error for a damaged ``path`` (``reason``: what is wrong; ``fix``: what to do)."""
    return DamagedFileError(f"{path} is damaged ({reason}); {fix}")


def _block_numbers(n: int) -> np.ndarray:
    """(n,) uint64 block numbers 1..n (the reused array when it is long enough)."""
    return _INDEX[:n] if n <= _INDEX.size else np.arange(1, n + 1, dtype=np.uint64)


def _digest(s1: int, s2: int, blocks: int, tail: bytes, length: int) -> str:
    """The ``fl64`` string from the sums over ``blocks`` whole blocks, the bytes after them and the length."""
    if tail:
        padded = tail + b"\0" * (-len(tail) % 8)
        last = int(np.add.reduce(np.frombuffer(padded, dtype=_WORDS), dtype=np.uint64))
        s1, s2 = (s1 + last) & _MASK, (s2 + (blocks + 1) * last) & _MASK
    s1 = (s1 + length) & _MASK  # appended or dropped zero bytes change the length
    return f"{FLETCHER_ALGORITHM}:{s1:016x}{s2:016x}"


class BlockFletcher64:
    """Streaming form of the ``fl64`` checksum of earlier versions (module docstring; verification only):
    ``update`` with buffers of any sizes and boundaries gives the same digest as one buffer holding them all."""

    def __init__(self) -> None:
        self.s1 = 0
        self.s2 = 0
        self.blocks = 0  # whole blocks summed so far
        self.length = 0  # bytes seen so far
        self.tail = b""  # bytes after the last whole block (< one block)

    def update(self, buffer: Any) -> BlockFletcher64:
        data = np.frombuffer(buffer, dtype=np.uint8)  # (n,) zero-copy view of bytes / memoryview / array
        self.length += data.size
        if self.tail:
            need = _BLOCK_BYTES - len(self.tail)
            self.tail += data[:need].tobytes()
            data = data[need:]
            if len(self.tail) < _BLOCK_BYTES:
                return self
            self._add_blocks(np.frombuffer(self.tail, dtype=np.uint8))
            self.tail = b""
        whole = data.size // _BLOCK_BYTES * _BLOCK_BYTES
        if whole:
            self._add_blocks(data[:whole])
        if whole < data.size:
            self.tail = data[whole:].tobytes()
        return self

    def _add_blocks(self, data: np.ndarray) -> None:
        sums = self._block_sums(data)  # (n_blocks,)
        n = sums.size
        index = _block_numbers(n)  # (n_blocks,)
        # uint64 arithmetic wraps: these are the sums mod 2**64. Block j of this call is block
        # self.blocks + j overall: s2 gains sum_j (self.blocks + j) b_j.
        total = int(np.add.reduce(sums, dtype=np.uint64))
        self.s1 = (self.s1 + total) & _MASK
        self.s2 = (self.s2 + int(np.dot(sums, index)) + self.blocks * total) & _MASK
        self.blocks += n

    @staticmethod
    def _block_sums(data: np.ndarray) -> np.ndarray:
        words = data.view(_WORDS).reshape(-1, _BLOCK_WORDS)  # (n_blocks, 4096)
        return np.add.reduce(words, axis=1, dtype=np.uint64)

    def hexdigest(self) -> str:
        return _digest(self.s1, self.s2, self.blocks, self.tail, self.length)


class _Xxh3:
    """The checksum this version writes: streaming XXH3-128 (any buffer sizes and boundaries)."""

    def __init__(self) -> None:
        self.state = xxhash.xxh3_128()

    def update(self, buffer: Any) -> _Xxh3:
        self.state.update(buffer)
        return self

    def hexdigest(self) -> str:
        return f"{ALGORITHM}:{self.state.hexdigest()}"


class _Crc32:
    """The checksum of files written before ``fl64`` (verification only)."""

    def __init__(self) -> None:
        self.crc = 0

    def update(self, buffer: Any) -> _Crc32:
        self.crc = zlib.crc32(buffer, self.crc)
        return self

    def hexdigest(self) -> str:
        return f"{LEGACY_ALGORITHM}:{self.crc & 0xFFFFFFFF:08x}"


_HASHERS = {ALGORITHM: _Xxh3, FLETCHER_ALGORITHM: BlockFletcher64, LEGACY_ALGORITHM: _Crc32}
PLACEHOLDER = f"{ALGORITHM}:{'0' * 32}"  # same width as every checksum this version writes


def new_hasher() -> _Xxh3:
    """A streaming hasher of the checksum this version writes: ``update(buffer)`` as the bytes go out
    (buffers of any size), then ``hexdigest()`` gives the record (``"xxh3:..."``)."""
    return _Xxh3()


def bytes_checksum(chunks: Iterable[Any], algorithm: str = ALGORITHM) -> str:
    """Checksum over a sequence of buffers (bytes, memoryviews, contiguous numpy arrays)."""
    hasher = _HASHERS[algorithm]()
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.hexdigest()


def checksum_matches(chunks: Iterable[Any], recorded: Any) -> bool:
    """Whether the buffers have the checksum ``recorded`` (any algorithm, by its prefix); a record
    that is no checksum at all (a damaged record) never matches."""
    algorithm = recorded.split(":", 1)[0] if isinstance(recorded, str) else None
    if algorithm not in _HASHERS:
        return False
    return bytes_checksum(chunks, algorithm) == recorded


def tensor_bytes(tensor: torch.Tensor) -> Any:
    """The raw bytes of a CPU tensor as a zero-copy buffer (any dtype, bf16 included)."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.view(torch.uint8).numpy()


def tensor_checksum(tensor: torch.Tensor) -> str:
    """Checksum of a CPU tensor's raw bytes (its layout on disk in a safetensors file)."""
    return bytes_checksum([tensor_bytes(tensor)])


def file_chunks(path: str | os.PathLike) -> Iterable[bytes]:
    """A file's bytes in 16 MiB chunks (bounded memory)."""
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            yield chunk


def file_checksum(path: str | os.PathLike) -> str:
    """Checksum of a whole file, read in 16 MiB chunks (bounded memory)."""
    return bytes_checksum(file_chunks(path))


def file_matches(path: str | os.PathLike, recorded: Any) -> bool:
    """Whether the file at ``path`` has the checksum ``recorded`` (any algorithm)."""
    return checksum_matches(file_chunks(path), recorded)


def read_json(path: str | os.PathLike, fix: str) -> Any:
    """Parse a JSON file, or raise a one-line error naming it (``fix``: what to do if it is damaged).

    Raises:
        DamagedFileError: the file is empty, truncated, not UTF-8 or not JSON.
        UserFacingError: the file cannot be read (missing, permissions).
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise damaged(path, f"not UTF-8 at byte {exc.start}", fix) from None
    except OSError as exc:
        raise UserFacingError(f"{path} cannot be read ({exc.strerror or exc}); {fix}") from None
    if not text.strip():
        raise damaged(path, "empty", fix)
    try:
        return json.loads(text)
    except ValueError as exc:
        where = f"line {exc.lineno} column {exc.colno}" if hasattr(exc, "lineno") else str(exc)
        raise damaged(path, f"invalid JSON at {where}", fix) from None
