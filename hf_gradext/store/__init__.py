"""Data at rest: sharded safetensors with the index inside each shard, written atomically and async,
checksummed (:mod:`hf_gradext.store.integrity`); one output-directory policy for every writer
(:mod:`hf_gradext.store.policy`); disk-full / read-only errors as one line (:mod:`hf_gradext.store.disk`)."""

from hf_gradext.store.disk import DiskError, disk_errors
from hf_gradext.store.integrity import DamagedFileError, read_json
from hf_gradext.store.shards import (
    ShardInfo,
    ShardLayout,
    ShardWriter,
    StoreWriteError,
    ensure_writable_dir,
    inspect_shard,
    iter_index,
    list_shards,
    read_shard,
    read_shard_header,
    write_json_atomic,
    write_shard_atomic,
)

__all__ = [
    "DamagedFileError",
    "DiskError",
    "ShardInfo",
    "ShardLayout",
    "ShardWriter",
    "StoreWriteError",
    "disk_errors",
    "ensure_writable_dir",
    "inspect_shard",
    "iter_index",
    "list_shards",
    "read_json",
    "read_shard",
    "read_shard_header",
    "write_json_atomic",
    "write_shard_atomic",
]
