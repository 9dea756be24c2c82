"""Data at rest: sharded safetensors with the index inside each shard, written atomically and async;
one output-directory policy for every writer (:mod:`hf_gradext.store.policy`)."""

from hf_gradext.store.shards import (
    ShardInfo,
    ShardWriter,
    StoreWriteError,
    ensure_writable_dir,
    iter_index,
    list_shards,
    read_shard,
    read_shard_header,
    write_json_atomic,
    write_shard_atomic,
)

__all__ = [
    "ShardInfo",
    "ShardWriter",
    "StoreWriteError",
    "ensure_writable_dir",
    "iter_index",
    "list_shards",
    "read_shard",
    "read_shard_header",
    "write_json_atomic",
    "write_shard_atomic",
]
