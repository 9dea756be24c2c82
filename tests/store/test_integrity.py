"""The written ``xxh3`` checksum against xxhash's one-shot XXH3-128, its streaming form and what it detects;
the ``fl64`` records of earlier versions against a pure-Python oracle; legacy CRC-32."""

from __future__ import annotations

import random
import zlib

import numpy as np
import pytest
import torch
import xxhash

from hf_gradext.store.integrity import (
    PLACEHOLDER,
    BlockFletcher64,
    bytes_checksum,
    checksum_matches,
    file_checksum,
    file_matches,
    new_hasher,
    tensor_checksum,
)

BLOCK = 32 * 1024
MASK = (1 << 64) - 1


def oracle(data: bytes) -> str:
    """The written record: xxhash's one-shot XXH3-128 of the bytes."""
    return f"xxh3:{xxhash.xxh3_128_hexdigest(data)}"


def fletcher_oracle(data: bytes) -> str:
    """The ``fl64`` record of earlier versions, by its documented definition in Python integers."""
    s1 = s2 = 0
    for j, start in enumerate(range(0, len(data), BLOCK), 1):
        block = data[start : start + BLOCK]
        block += b"\0" * (-len(block) % 8)
        b = sum(int.from_bytes(block[i : i + 8], "little") for i in range(0, len(block), 8))
        s1 += b
        s2 += j * b
    return f"fl64:{(s1 + len(data)) & MASK:016x}{s2 & MASK:016x}"


LENGTHS = [0, 1, 7, 8, 9, 4095, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 13]


@pytest.mark.parametrize("length", LENGTHS)
def test_equals_the_oracle(length):
    data = random.Random(length).randbytes(length)
    assert bytes_checksum([data]) == oracle(data)
    assert len(bytes_checksum([data])) == len(PLACEHOLDER)  # fixed width: headers are rewritten in place


@pytest.mark.parametrize("length", [BLOCK + 1, 3 * BLOCK + 13, 100])
def test_streaming_equals_one_shot_for_any_split(length):
    rng = random.Random(7)
    data = rng.randbytes(length)
    for _ in range(20):
        cuts = sorted(rng.randrange(length + 1) for _ in range(rng.randrange(1, 6)))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, length])]
        assert bytes_checksum(pieces) == oracle(data)
        hasher = new_hasher()
        for piece in pieces:
            hasher.update(np.frombuffer(piece, dtype=np.uint8))  # what the shard writer passes
        assert hasher.hexdigest() == oracle(data)
    # numpy arrays of other dtypes and memoryviews hash their raw bytes
    array = np.frombuffer(data[: length // 4 * 4], dtype=np.float32)
    assert bytes_checksum([array]) == oracle(array.tobytes())
    assert bytes_checksum([memoryview(data)]) == oracle(data)


@pytest.mark.parametrize("length", LENGTHS)
def test_fletcher_records_of_earlier_versions_verify(length):
    rng = random.Random(length)
    data = rng.randbytes(length)
    recorded = fletcher_oracle(data)
    assert bytes_checksum([data], "fl64") == recorded
    cuts = sorted(rng.randrange(length + 1) for _ in range(3))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, length])]
    assert checksum_matches(pieces, recorded)
    if length:
        flipped = bytearray(data)
        flipped[length // 2] ^= 0x10
        assert not checksum_matches([bytes(flipped)], recorded)


def test_every_single_bit_flip_is_detected():
    data = bytearray(random.Random(1).randbytes(600))
    good = bytes_checksum([bytes(data)])
    for bit in range(len(data) * 8):
        data[bit // 8] ^= 1 << (bit % 8)
        assert bytes_checksum([bytes(data)]) != good, bit
        data[bit // 8] ^= 1 << (bit % 8)


def test_length_block_order_swapped_words_and_zeroed_blocks_are_detected():
    rng = random.Random(2)
    a, b = rng.randbytes(BLOCK), rng.randbytes(BLOCK)
    good = bytes_checksum([a + b])
    assert bytes_checksum([b + a]) != good  # blocks swapped
    assert bytes_checksum([a + b + b"\0"]) != good  # a zero byte appended
    assert bytes_checksum([a + b"\0" * BLOCK]) != good  # a block zeroed
    assert bytes_checksum([b"\0" * 8]) != bytes_checksum([b"\0" * 16])
    assert bytes_checksum([a[8:16] + a[:8] + a[16:]]) != bytes_checksum(
        [a]
    )  # two words swapped (fl64 missed it)


def test_legacy_crc32_records_still_verify(tmp_path):
    data = random.Random(3).randbytes(5000)
    legacy = f"crc32:{zlib.crc32(data):08x}"
    assert checksum_matches([data], legacy) and checksum_matches([data], bytes_checksum([data]))
    assert checksum_matches([data], fletcher_oracle(data))
    assert not checksum_matches([data + b"x"], legacy)
    for bad in (None, "", "md5:00", "fl64:zz", "xxh3:zz", 17):
        assert not checksum_matches([data], bad)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert file_checksum(path) == oracle(data) and file_matches(path, legacy)


def test_tensor_checksum_is_its_raw_bytes():
    t = torch.arange(1000, dtype=torch.bfloat16).reshape(10, 100)
    assert tensor_checksum(t) == oracle(t.view(torch.int16).numpy().tobytes())
    assert tensor_checksum(t.t()) == oracle(t.t().contiguous().view(torch.int16).numpy().tobytes())


def test_streaming_object_reuses_no_state_between_instances():
    h = BlockFletcher64().update(b"abc")
    assert h.hexdigest() == h.hexdigest() == fletcher_oracle(b"abc")
    assert BlockFletcher64().hexdigest() == fletcher_oracle(b"")
    h = new_hasher().update(b"abc")
    assert h.hexdigest() == h.hexdigest() == oracle(b"abc")
    assert new_hasher().hexdigest() == oracle(b"")
