import json

import pytest
import torch

from hf_gradext.errors import UserFacingError
from hf_gradext.projection.io import (
    ProjectionShardWriter,
    completed_example_ids,
    iter_projection_blocks,
    load_projections,
    prune_rows_from_step,
    read_metadata,
    write_json_atomic,
)
from hf_gradext.store import list_shards


def _dir(tmp_path, dtype=torch.bfloat16, dim=6):
    write_json_atomic(tmp_path / "metadata.json", {"total_proj_dim": dim, "layers": []})
    return tmp_path


def _write(directory, rank, ids, dtype, save_interval=1, steps=None, dim=6):
    writer = ProjectionShardWriter(directory, rank=rank, save_interval=save_interval, dtype=dtype)
    rows = torch.stack([torch.arange(dim, dtype=torch.float32) + 100 * i for i in ids])  # row encodes its id
    for j, i in enumerate(ids):
        step = steps[j] if steps else j
        writer.add(rows[j : j + 1], [{"example_id": i, "step": step}])
    writer.close()
    return rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_load_merges_ranks_sorted_by_id_memory_mapped(tmp_path, dtype):
    d = _dir(tmp_path)
    _write(d, 0, [0, 2, 4, 6], dtype, save_interval=3)  # shards of 3 and 1 rows
    _write(d, 1, [1, 3, 5], dtype)
    rows, ids, meta = load_projections(d)
    assert ids == list(range(7)) and rows.dtype == dtype and meta["total_proj_dim"] == 6
    expected = torch.stack([torch.arange(6, dtype=torch.float32) + 100 * i for i in range(7)]).to(dtype)
    assert torch.equal(rows, expected)
    cached = list((d / ".cache").glob("rows-*.bin"))
    assert len(cached) == 1 and cached[0].stat().st_size == 7 * 6 * rows.element_size()
    # cached file reused: same key, same content; a new shard invalidates it
    assert torch.equal(load_projections(d)[0], expected)
    _write(d, 2, [7], dtype)
    rows, ids, _ = load_projections(d)
    assert ids == list(range(8)) and rows.shape == (8, 6)


def test_single_shard_in_order_is_zero_copy_memmap(tmp_path):
    d = _dir(tmp_path)
    _write(d, 0, [0, 1, 2], torch.float32, save_interval=5)
    rows, ids, _ = load_projections(d)
    assert ids == [0, 1, 2] and not (d / ".cache").exists()
    assert rows[2, 5] == 205


def test_repeated_ids_keep_write_order(tmp_path):
    d = _dir(tmp_path)
    _write(d, 0, [3, 1, 3], torch.float32)
    rows, ids, _ = load_projections(d)
    assert ids == [3, 1, 3] and rows[:, 0].tolist() == [300, 100, 300]
    with pytest.raises(UserFacingError, match="duplicated"):
        load_projections(d, sort_by_id=True)


def test_unwritable_cache_location_falls_back_to_temp(tmp_path):
    d = _dir(tmp_path)
    _write(d, 0, [1, 0], torch.float32)
    (d / ".cache").write_text("not a directory")  # the cache dir cannot be created here
    rows, ids, _ = load_projections(d)
    assert ids == [0, 1] and rows[0, 0] == 0 and rows[1, 0] == 100


def test_completed_ids_iter_blocks_and_empty_dir(tmp_path):
    d = _dir(tmp_path)
    assert load_projections(d)[0].shape == (0, 6)
    _write(d, 0, [5, 7], torch.float32)
    assert completed_example_ids(d) == {5, 7}
    blocks = list(iter_projection_blocks(d))
    assert [b[1][0]["example_id"] for b in blocks] == [5, 7]


def test_prune_rows_from_step_rewrites_shards_atomically(tmp_path):
    d = _dir(tmp_path)
    _write(d, 0, [0, 1, 2, 3, 4, 5], torch.float32, save_interval=2, steps=[0, 0, 1, 1, 2, 2])
    _write(d, 1, [6, 7], torch.float32, steps=[1, 2])
    assert prune_rows_from_step(d, rank=0, step=1) == 4
    assert len(list_shards(d, "proj", 0)) == 1
    rows, ids, _ = load_projections(d)
    assert ids == [0, 1, 6, 7] and rows[:, 0].tolist() == [0, 100, 600, 700]


def test_read_metadata_missing_is_user_error(tmp_path):
    with pytest.raises(UserFacingError, match="metadata.json"):
        read_metadata(tmp_path)


def test_write_json_atomic_leaves_no_temp(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_write_json_atomic_failure_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    import os

    write_json_atomic(tmp_path / "a.json", {"x": 1})

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(UserFacingError, match=r"a\.json failed \(No space left on device\)"):
        write_json_atomic(tmp_path / "a.json", {"x": 2})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_writer_rejects_mismatched_index(tmp_path):
    writer = ProjectionShardWriter(tmp_path)
    with pytest.raises(ValueError):
        writer.add(torch.zeros(2, 3), [{"example_id": 0}])
    writer.close()
