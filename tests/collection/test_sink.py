import torch

from hf_gradext.collection.sink import PREFIX, GradientSink, prune_after_step, shard_step
from hf_gradext.store import list_shards, read_shard


def _rows(step, layer, n, start=0):
    return [
        {"step": step, "example_id": start + i, "rank": 0, "layer": layer, "sample": start + i, "offset": i}
        for i in range(n)
    ]


def _steps_on_disk(directory):
    return [shard_step(s.path) for s in list_shards(directory, PREFIX)]


def test_one_step_per_shard_and_a_key_never_twice(tmp_path):
    sink = GradientSink(tmp_path)
    sink.add(1, "a", {"norm::a": torch.ones(2)}, _rows(1, "a", 2), group="attn")
    sink.add(1, "b", {"norm::b": torch.ones(2)}, _rows(1, "b", 2))  # same shard
    sink.add(1, "a", {"norm::a": torch.ones(1)}, _rows(1, "a", 1, start=2))  # key again: new shard
    sink.add(2, "a", {"norm::a": torch.ones(2)}, _rows(2, "a", 2))  # new step: new shard
    sink.close()
    shards = list_shards(tmp_path, PREFIX)
    assert _steps_on_disk(tmp_path) == [1, 1, 2]
    tensors, rows, meta = read_shard(shards[0].path)
    assert set(tensors) == {"norm::a", "norm::b"} and len(rows) == 4
    assert meta["step"] == 1 and meta["groups"] == {"a": "attn"} and meta["kind"] == "norms"


def test_target_size_splits_shards(tmp_path):
    sink = GradientSink(tmp_path, target_shard_bytes=64)
    for layer in "abc":
        sink.add(5, layer, {layer: torch.zeros(2, 10)}, _rows(5, layer, 2), params=[layer])  # 80 bytes each
    sink.flush()
    assert len(list_shards(tmp_path)) == 3
    _, _, meta = read_shard(list_shards(tmp_path)[0].path)
    assert meta["kind"] == "full" and meta["params"] == {"a": ["a"]}
    sink.close()


def test_prune_after_step_removes_only_later_steps_and_numbering_continues(tmp_path):
    sink = GradientSink(tmp_path)
    for step in (2, 4, 6):
        sink.add(step, "a", {"norm::a": torch.ones(1)}, _rows(step, "a", 1))
        sink.end_step()
    sink.close()
    removed = prune_after_step(tmp_path, rank=0, step=4)
    assert [p.name for p in removed] == ["grads-rank000-000002.safetensors"]
    assert _steps_on_disk(tmp_path) == [2, 4]
    assert prune_after_step(tmp_path, rank=1, step=0) == []  # other ranks untouched
    resumed = GradientSink(tmp_path)
    assert resumed.writer.next_seq == 2
    resumed.add(6, "a", {"norm::a": torch.ones(1)}, _rows(6, "a", 1))
    resumed.close()
    assert _steps_on_disk(tmp_path) == [2, 4, 6]


def test_discard_drops_pending_without_writing(tmp_path):
    sink = GradientSink(tmp_path)
    sink.add(1, "a", {"norm::a": torch.ones(1)}, _rows(1, "a", 1))
    sink.discard()
    assert list_shards(tmp_path) == []
