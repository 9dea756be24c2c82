"""The ``fl64`` checksum against a pure-Python oracle, its streaming form, what it detects, and legacy CRC-32."""

from __future__ import annotations

import random
import zlib

import numpy as np
import pytest
import torch

from hf_gradext.store.integrity import (
    PLACEHOLDER,
    BlockFletcher64,
    BufferFletcher64,
    bytes_checksum,
    checksum_matches,
    file_checksum,
    file_matches,
    tensor_checksum,
)

BLOCK = 32 * 1024
MASK = (1 << 64) - 1


def oracle(data: bytes) -> str:
    """The documented definition, word by word in Python integers."""
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
    assert len(bytes_checksum([data])) == len(PLACEHOLDER)


@pytest.mark.parametrize("length", [BLOCK + 1, 3 * BLOCK + 13, 100])
def test_streaming_equals_one_shot_for_any_split(length):
    rng = random.Random(7)
    data = rng.randbytes(length)
    for _ in range(20):
        cuts = sorted(rng.randrange(length + 1) for _ in range(rng.randrange(1, 6)))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, length])]
        assert bytes_checksum(pieces) == oracle(data)
    # numpy arrays of other dtypes and memoryviews hash their raw bytes
    array = np.frombuffer(data[: length // 4 * 4], dtype=np.float32)
    assert bytes_checksum([array]) == oracle(array.tobytes())
    assert bytes_checksum([memoryview(data)]) == oracle(data)


@pytest.mark.parametrize("length", [*LENGTHS, 70 * BLOCK + 3])  # 70 blocks: past the reused 64-entry index
@pytest.mark.parametrize("slice_blocks", [1, 3, 8])
def test_buffer_form_equals_the_oracle_for_block_aligned_ranges(length, slice_blocks):
    data = random.Random(length).randbytes(length)
    hasher = BufferFletcher64(data)
    step = slice_blocks * BLOCK
    for begin in range(0, max(length, 1), step):
        hasher.hash_range(begin, begin + step)  # the last range may run past the end
    assert hasher.hexdigest() == oracle(data)


def test_buffer_form_refuses_misaligned_ranges_and_partial_coverage():
    data = bytes(3 * BLOCK)
    with pytest.raises(ValueError, match="aligned"):
        BufferFletcher64(data).hash_range(8, BLOCK)
    with pytest.raises(ValueError, match="aligned"):
        BufferFletcher64(data).hash_range(0, BLOCK + 8)
    hasher = BufferFletcher64(data)
    hasher.hash_range(0, BLOCK)
    with pytest.raises(RuntimeError, match="1 of 3 blocks"):
        hasher.hexdigest()


def test_shard_writer_slices_are_whole_blocks():
    from hf_gradext.store.safetensors_file import SLICE_BYTES

    assert SLICE_BYTES % BLOCK == 0  # what BufferFletcher64.hash_range needs


def test_every_single_bit_flip_is_detected():
    data = bytearray(random.Random(1).randbytes(600))
    good = bytes_checksum([bytes(data)])
    for bit in range(len(data) * 8):
        data[bit // 8] ^= 1 << (bit % 8)
        assert bytes_checksum([bytes(data)]) != good, bit
        data[bit // 8] ^= 1 << (bit % 8)


def test_length_block_order_and_zeroed_blocks_are_detected():
    rng = random.Random(2)
    a, b = rng.randbytes(BLOCK), rng.randbytes(BLOCK)
    good = bytes_checksum([a + b])
    assert bytes_checksum([b + a]) != good  # blocks swapped
    assert bytes_checksum([a + b + b"\0"]) != good  # a zero byte appended
    assert bytes_checksum([a + b"\0" * BLOCK]) != good  # a block zeroed
    assert bytes_checksum([b"\0" * 8]) != bytes_checksum([b"\0" * 16])


def test_legacy_crc32_records_still_verify(tmp_path):
    data = random.Random(3).randbytes(5000)
    legacy = f"crc32:{zlib.crc32(data):08x}"
    assert checksum_matches([data], legacy) and checksum_matches([data], bytes_checksum([data]))
    assert not checksum_matches([data + b"x"], legacy)
    for bad in (None, "", "md5:00", "fl64:zz", 17):
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
    assert h.hexdigest() == h.hexdigest() == oracle(b"abc")
    assert BlockFletcher64().hexdigest() == oracle(b"")
