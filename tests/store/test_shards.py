import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from hf_gradext.errors import UserFacingError
from hf_gradext.store import (
    ShardWriter,
    StoreWriteError,
    ensure_writable_dir,
    iter_index,
    list_shards,
    read_shard,
    read_shard_header,
)
from hf_gradext.store import shards as shards_mod


def _rows(step, n):
    return [{"step": step, "example_id": step * 10 + i, "rank": 0} for i in range(n)]


def test_round_trip_tensors_rows_and_meta(tmp_path):
    data = {"x": torch.arange(12, dtype=torch.float32).reshape(3, 4), "ids": torch.tensor([5, 6, 7])}
    with ShardWriter(tmp_path, prefix="grads") as writer:
        path = writer.write(data, _rows(0, 3), {"layer": "h.0"})
    tensors, rows, meta = read_shard(path)
    assert torch.equal(tensors["x"], data["x"]) and torch.equal(tensors["ids"], data["ids"])
    assert rows == _rows(0, 3) and meta == {"layer": "h.0"}
    assert read_shard_header(path) == (rows, meta)
    assert read_shard(path, keys=["ids"])[0].keys() == {"ids"}


def test_writer_copies_so_caller_can_reuse_buffers(tmp_path):
    buf = torch.zeros(4)
    with ShardWriter(tmp_path) as writer:
        path = writer.write({"v": buf})
        buf.fill_(7.0)
    assert torch.equal(read_shard(path)[0]["v"], torch.zeros(4))


def test_index_spans_shards_in_order_and_resume_continues_numbering(tmp_path):
    with ShardWriter(tmp_path, prefix="p") as writer:
        for step in range(3):
            writer.write({"v": torch.full((2,), float(step))}, _rows(step, 2))
    with ShardWriter(tmp_path, prefix="p") as writer:  # a resumed run
        assert writer.next_seq == 3
        writer.write({"v": torch.zeros(2)}, _rows(3, 2))
    assert [s.seq for s in list_shards(tmp_path, "p")] == [0, 1, 2, 3]
    index = list(iter_index(tmp_path, "p"))
    assert [r["example_id"] for r in index] == [0, 1, 10, 11, 20, 21, 30, 31]
    assert [r["row"] for r in index[:2]] == [0, 1]
    assert index[2]["shard"] == "p-rank000-000001.safetensors"


def test_ranks_and_prefixes_do_not_collide(tmp_path):
    with ShardWriter(tmp_path, prefix="a", rank=0) as w0, ShardWriter(tmp_path, prefix="a", rank=1) as w1:
        w0.write({"v": torch.zeros(1)})
        w1.write({"v": torch.ones(1)})
    with ShardWriter(tmp_path, prefix="b") as wb:
        wb.write({"v": torch.ones(1)})
    assert len(list_shards(tmp_path, "a")) == 2 and len(list_shards(tmp_path, "a", rank=1)) == 1
    assert len(list_shards(tmp_path)) == 3


def test_disk_full_keeps_completed_shards_and_raises_one_clear_error(tmp_path, monkeypatch):
    real_save = shards_mod.write_safetensors
    calls = {"n": 0}

    def flaky_save(handle, tensors, metadata_for, checksums):
        calls["n"] += 1
        if calls["n"] == 3:  # a partial file, then the disk is full
            handle.write(b"\x00" * 64)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(handle, tensors, metadata_for, checksums)

    monkeypatch.setattr(shards_mod, "write_safetensors", flaky_save)
    writer = ShardWriter(tmp_path, prefix="g", flag="--gradient_collection_dir")
    for step in range(2):
        writer.write({"v": torch.full((3,), float(step))}, _rows(step, 1))
    writer.flush()
    writer.write({"v": torch.zeros(3)}, _rows(2, 1))
    with pytest.raises(StoreWriteError) as err:
        writer.flush()
    message = str(err.value)
    assert "No space left" in message and "--gradient_collection_dir" in message and "\n" not in message
    with pytest.raises(StoreWriteError):
        writer.write({"v": torch.zeros(3)})
    with pytest.raises(StoreWriteError):
        writer.close()
    assert [s.seq for s in list_shards(tmp_path, "g")] == [0, 1]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert [r["step"] for r in iter_index(tmp_path, "g")] == [0, 1]


_KILLED_WRITER = textwrap.dedent(
    """
    import sys, torch
    from hf_gradext.store import ShardWriter, shards
    real = shards.write_safetensors
    def slow_save(handle, tensors, metadata_for, checksums):
        if "000001" in handle.name:
            handle.write(b"partial"); handle.flush()
            print("WRITING", flush=True)
            import time; time.sleep(60)
        return real(handle, tensors, metadata_for, checksums)
    shards.write_safetensors = slow_save
    w = ShardWriter(sys.argv[1], prefix="k")
    w.write({"v": torch.ones(4)}, [{"step": 0}])
    w.flush()
    w.write({"v": torch.ones(4)}, [{"step": 1}])
    w.flush()
    """
)


def test_writer_killed_mid_shard_leaves_only_complete_shards(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert [s.seq for s in list_shards(tmp_path, "k")] == [0]
    assert [r["step"] for r in iter_index(tmp_path, "k")] == [0]
    assert any(".tmp-" in p.name for p in tmp_path.iterdir())  # the stale half file is there...
    with ShardWriter(tmp_path, prefix="k") as writer:  # ...and a resumed writer cleans it up
        assert writer.next_seq == 1
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())


def test_bounded_queue_blocks_caller_until_disk_catches_up(tmp_path, monkeypatch):
    real_save = shards_mod.write_safetensors
    in_flight = []

    def slow_save(handle, tensors, metadata_for, checksums):
        in_flight.append(handle.name)
        time.sleep(0.05)
        return real_save(handle, tensors, metadata_for, checksums)

    monkeypatch.setattr(shards_mod, "write_safetensors", slow_save)
    with ShardWriter(tmp_path, max_queue=1) as writer:
        for _ in range(4):
            writer.write({"v": torch.zeros(2)})
            # at most one queued + one being written
            assert writer.next_seq - len(writer.written) <= 2 + 1
    assert len(list_shards(tmp_path)) == 4


def test_bad_directories_fail_fast_with_the_flag_named(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(UserFacingError, match="--proj_output_dir=.* is a file"):
        ensure_writable_dir(a_file, "--proj_output_dir")
    if os.geteuid() != 0:  # root can write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UserFacingError, match="not writable"):
            ensure_writable_dir(locked / "sub", "--gradient_collection_dir")
    with pytest.raises(UserFacingError, match="--gradient_collection_dir=.* is not writable"):
        ensure_writable_dir(a_file / "sub", "--gradient_collection_dir")  # parent is a file
    with pytest.raises(UserFacingError, match="prefix"):
        ShardWriter(tmp_path, prefix="a/b")
