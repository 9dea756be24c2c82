"""Shards (and the index rows in their headers): truncation, bit flips, old shards without checksums.

Four shards are written; shard 2 is damaged; reading it fails in one line naming it, and shards 0, 1 and 3
still read back equal. The same through ``hf-gradext analyze gradients`` (exit code 2).
"""

from __future__ import annotations

import pytest
import torch

from hf_gradext.cli import main as cli_main
from hf_gradext.collection.sink import GradientSink
from hf_gradext.store import (
    DamagedFileError,
    ShardWriter,
    iter_index,
    list_shards,
    read_shard,
    read_shard_header,
)
from hf_gradext.store.shards import write_shard_atomic
from tests.faults._damage import (
    assert_cli_error,
    assert_one_line,
    find,
    flip_bit,
    flip_digit,
    safetensors_data_offset,
    truncate,
)


def _tensors(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return {
        "g": torch.randn(4, 3, generator=gen),
        "b": torch.randn(4, 2, generator=gen).bfloat16(),
        "ids": torch.arange(4) + 10 * step,
        "norm": torch.rand(4, generator=gen),
    }


def _rows(step: int) -> list[dict]:
    return [{"step": step, "example_id": 10 * step + i, "rank": 0} for i in range(4)]


@pytest.fixture
def shards(tmp_path):
    with ShardWriter(tmp_path, prefix="grads") as writer:
        for step in range(4):
            writer.write(_tensors(step), _rows(step), {"kind": "norms", "step": step})
    return [info.path for info in list_shards(tmp_path, "grads")]


def _after(key: bytes, then: bytes):
    """Flip one digit of the first ``then`` after ``key`` (inside the header)."""

    def damage(path):
        at = find(path, key)
        flip_digit_at(path, find(path, then, at) + len(then))

    return damage


def flip_digit_at(path, at):
    data = path.read_bytes()
    while not chr(data[at]).isdigit():
        at += 1
    flip_bit(path, at, 0)


# case -> (damage, how it is detected: "checksum" = a checksum mismatch, "structure" = bounds / parse)
SHARD_FAULTS = {
    "truncated_to_half": (lambda p: truncate(p, 0.5), "structure"),
    "truncated_by_one_byte": (lambda p: truncate(p, p.stat().st_size - 1), "structure"),
    "truncated_inside_header": (lambda p: truncate(p, 40), "structure"),
    "truncated_to_4_bytes": (lambda p: truncate(p, 4), "structure"),
    "empty_file": (lambda p: truncate(p, 0), "structure"),
    "random_bytes": (lambda p: p.write_bytes(bytes(range(256)) * (p.stat().st_size // 256 + 1)), "structure"),
    "bit_flip_header_length": (lambda p: flip_bit(p, 0, 3), "structure"),
    "bit_flip_header_brace": (lambda p: flip_bit(p, 8, 0), "structure"),
    "bit_flip_tensor_shape": (lambda p: flip_digit(p, b'"shape":['), "structure"),
    "bit_flip_tensor_dtype": (lambda p: flip_digit(p, b'"dtype":"F'), "structure"),
    "bit_flip_format_key_name": (lambda p: flip_bit(p, find(p, b"hf_gradext_format"), 1), "structure"),
    "bit_flip_first_tensor_byte": (lambda p: flip_bit(p, safetensors_data_offset(p) + 1, 6), "checksum"),
    "bit_flip_last_tensor_byte": (lambda p: flip_bit(p, -1, 0), "checksum"),
    # float32 exponent bit of a norm: 0.5 -> ~1.7e38 (the "norms of 1e24" of the issue)
    "bit_flip_float_exponent": (lambda p: flip_bit(p, safetensors_data_offset(p) + 3, 6), "checksum"),
    "bit_flip_index_row_digit": (_after(b"hf_gradext_rows", b"example_id"), "checksum"),
    "bit_flip_metadata_digit": (_after(b"hf_gradext_meta", b"step"), "checksum"),
    "bit_flip_recorded_checksum": (_after(b"hf_gradext_checksums", b"xxh3:"), "checksum"),
}


def _assert_intact(paths, damaged_index):
    for i, path in enumerate(paths):
        if i == damaged_index:
            continue
        tensors, rows, meta = read_shard(path)
        expected = _tensors(i)
        assert tensors.keys() == expected.keys()
        assert all(torch.equal(tensors[k], expected[k]) for k in expected)
        assert rows == _rows(i) and meta == {"kind": "norms", "step": i}


@pytest.mark.parametrize("case", list(SHARD_FAULTS))
def test_damaged_shard_is_one_line_naming_it_and_the_others_load(shards, case):
    damage, _ = SHARD_FAULTS[case]
    bad = shards[2]
    damage(bad)
    with pytest.raises(DamagedFileError) as err:
        read_shard(bad)
    assert_one_line(str(err.value), bad.name, "delete this shard")
    try:
        list(iter_index(bad.parent, "grads"))  # the header alone may still be fine (tensor bytes damaged)
    except DamagedFileError as exc:
        assert_one_line(str(exc), bad.name)
    _assert_intact(shards, 2)


def test_a_clean_round_trip_verifies(shards):
    _assert_intact(shards, None)
    assert [r["example_id"] for r in iter_index(shards[0].parent, "grads")][:5] == [0, 1, 2, 3, 10]


def test_old_shards_without_checksums_still_load(tmp_path):
    """Format 1 (before checksums): loads as before; there is nothing to verify it against."""
    path = tmp_path / "grads-rank000-000000.safetensors"
    write_shard_atomic(path, _tensors(0), _rows(0), {"step": 0}, checksums=False)
    rows, meta = read_shard_header(path)
    assert rows == _rows(0) and meta == {"step": 0}
    tensors, _, _ = read_shard(path)
    assert torch.equal(tensors["g"], _tensors(0)["g"])
    flip_bit(path, -1, 0)  # undetectable without a checksum: still loads (the documented limit)
    assert read_shard(path)[0]["norm"].shape == (4,)
    truncate(path, 0.5)  # a truncation is caught by the bounds check all the same
    with pytest.raises(DamagedFileError, match=path.name):
        read_shard(path)


def test_shards_with_fletcher_checksums_of_earlier_versions_verify(tmp_path, monkeypatch):
    """Shards written before ``xxh3`` (2026-12-04) carry ``fl64`` records: they load, and damage is caught."""
    import hf_gradext.store.safetensors_file as safetensors_file
    import hf_gradext.store.shards as shards_module
    from hf_gradext.store.integrity import BlockFletcher64, bytes_checksum

    path = tmp_path / "grads-rank000-000000.safetensors"
    with monkeypatch.context() as patch:  # write as the earlier version did
        patch.setattr(safetensors_file, "new_hasher", BlockFletcher64)
        patch.setattr(shards_module, "bytes_checksum", lambda chunks: bytes_checksum(chunks, "fl64"))
        write_shard_atomic(path, _tensors(0), _rows(0), {"step": 0})
    assert b"fl64:" in path.read_bytes() and b"xxh3:" not in path.read_bytes()
    tensors, rows, meta = read_shard(path)
    assert all(torch.equal(tensors[k], v) for k, v in _tensors(0).items())
    assert rows == _rows(0) and meta == {"step": 0}
    flip_bit(path, -1, 0)
    with pytest.raises(DamagedFileError, match="fails its checksum"):
        read_shard(path)


def test_safetensors_own_reader_reads_our_shards(shards):
    from safetensors.torch import load_file

    loaded = load_file(str(shards[1]))
    assert all(torch.equal(loaded[k], v) for k, v in _tensors(1).items())


# ---------------------------------------------------------------------------- through the CLI
def _collection_dir(directory):
    sink = GradientSink(directory, rank=0, target_shard_bytes=1)
    norms = {}
    for step in (1, 2, 3):
        norm = torch.rand(2, generator=torch.Generator().manual_seed(step))
        norms[step] = norm
        rows = [
            {"step": step, "example_id": i, "rank": 0, "layer": "h.0.mlp", "sample": i, "offset": i}
            for i in range(2)
        ]
        sink.add(step, "h.0.mlp", {"norm::h.0.mlp": norm}, rows, group="mlp")
        sink.end_step()
    sink.close()
    return norms


@pytest.mark.parametrize("case", ["bit_flip_float_exponent", "truncated_to_half", "bit_flip_index_row_digit"])
def test_analyze_gradients_exits_2_naming_the_damaged_shard(tmp_path, capsys, case):
    norms = _collection_dir(tmp_path)
    paths = [info.path for info in list_shards(tmp_path, "grads")]
    assert len(paths) == 3
    SHARD_FAULTS[case][0](paths[1])
    code = cli_main(["analyze", "gradients", str(tmp_path), "--no-plots"])
    assert_cli_error(code, capsys, paths[1].name)
    for path, step in ((paths[0], 1), (paths[2], 3)):  # the shards before and after the damaged one
        assert torch.equal(read_shard(path)[0]["norm::h.0.mlp"], norms[step])
