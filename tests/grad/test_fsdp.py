"""The engine on an FSDP2 (``fully_shard``) model: 2 CPU processes (gloo), parameters really sharded.

Each rank computes per-sample gradients and norms of its own batch through the sharded model and
compares them with the float64 oracle of an unwrapped copy; the ranks report back through JSON files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _worker(rank: int, directory: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))  # spawned processes start without pytest's paths
    from _grad_helpers import dense, ragged_batch, rel_err, tiny_gpt2
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from hf_gradext.grad import per_sample_grad_norms, per_sample_gradients
    from hf_gradext.process_group import end_process_group

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=rank, world_size=WORLD)
    model, batch = tiny_gpt2(), ragged_batch(seed=rank)  # same weights, different data per rank
    ref = per_sample_gradients(model, batch, layers="all", dtype=torch.float64)
    ref_norms = per_sample_grad_norms(model, batch, layers="all")
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = isinstance(model.transformer.h[0].mlp.c_fc.weight, DTensor)
    got = per_sample_gradients(model, batch, layers="all", dtype=torch.float64)
    norms = per_sample_grad_norms(model, batch, layers="all")
    result = {
        "sharded": sharded,
        "same_names": sorted(got) == sorted(ref),
        "shapes_ok": all(tuple(dense(got[n]).shape) == tuple(dense(ref[n]).shape) for n in ref),
        "worst_rel_err": max(rel_err(dense(got[n]), dense(ref[n])) for n in ref),
        "norm_rel_err": rel_err(norms, ref_norms),
    }
    Path(directory, f"rank{rank}.json").write_text(json.dumps(result))
    end_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_per_sample_gradients_and_norms_through_fully_shard(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD)
    for rank in range(WORLD):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["sharded"] and r["same_names"] and r["shapes_ok"], r
        # FSDP computes in the parameters' float64; only summation order differs from the oracle.
        assert r["worst_rel_err"] <= 1e-10, r
        assert r["norm_rel_err"] <= 1e-10, r
