"""``GQCOptimizer`` under 2-process DDP (gloo, CPU) against torch-gqc's ``distributed_mode="replicated"``."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("gradient_quality_control")

WORLD = 2


def _stream(n: int, rank: int):
    """Rank-specific microbatches of 4 samples (ranks see different data, as under a DistributedSampler)."""
    g = torch.Generator().manual_seed(100 + rank)
    for i in range(n):
        x = torch.randn(4, 6, generator=g) * (0.5 + (i % 5) / 2)
        yield x, x.sum(1, keepdim=True) + torch.randn(4, 1, generator=g) * (1 + rank)


def _pair(name: str):
    import gradient_quality_control as ref_pkg
    from gradient_quality_control.implementations.metric_hypothesis_test import OptimizerWrapperMHT

    from hf_gradext.gqc.wrapper import GQCOptimizer

    torch.manual_seed(0)
    base = torch.nn.Linear(6, 1)
    ref_model = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(base))
    my_model = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(base))
    ref_opt, my_opt = (torch.optim.SGD(m.parameters(), lr=0.02) for m in (ref_model, my_model))
    kw = {"distributed_mode": "replicated", "max_batch_draws": 6}
    if name == "gnts":
        ref, key, value = ref_pkg.OptimizerWrapperGNTS(ref_opt, **kw), "gradient_norm_threshold", 2.5
    elif name == "sbc":
        ref, key, value = ref_pkg.OptimizerWrapperSBC(ref_opt, 4, **kw), "logical_batch_size", 20.0
    elif name == "gns":
        ref, key, value = ref_pkg.OptimizerWrapperGNS(ref_opt, **kw), "noise_tolerance", 0.05
    else:
        ref, key, value = OptimizerWrapperMHT(ref_opt, **kw), "percent_error_threshold", 0.3
        for g in ref.optimizer.param_groups:
            g["confidence_level"] = 0.9
    for g in ref.optimizer.param_groups:
        g[key] = value
    mine = GQCOptimizer(my_opt, name, threshold=value, max_microbatches=6)  # detects the process group
    if name == "mht":
        mine.core.controller.confidence = 0.9
    return ref, mine, ref_model, my_model


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    result = {}
    for name in ("gnts", "sbc", "gns", "mht"):
        ref, mine, ref_model, my_model = _pair(name)
        ref_out, my_out = [], []
        for x, y in _stream(30, rank):
            losses = []
            for model in (ref_model, my_model):
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                losses.append(loss.item())
            ref_out.append(ref.step(losses[0]) if name == "mht" else ref.step())
            my_out.append(mine.step(losses[1], samples=4) if name == "mht" else mine.step(samples=4))
        same = all(
            torch.allclose(a, b) for a, b in zip(my_model.parameters(), ref_model.parameters(), strict=True)
        )
        result[name] = {"ref": ref_out, "mine": my_out, "params_match": same, "world": mine.world_size}
    # A model that is not DDP-wrapped: rank gradients differ, which must be refused rather than diverge.
    from hf_gradext.errors import UserFacingError
    from hf_gradext.gqc.wrapper import GQCOptimizer

    local = torch.nn.Linear(6, 1)
    opt = GQCOptimizer(torch.optim.SGD(local.parameters(), lr=0.1), "gnts")
    x, y = next(_stream(1, rank))
    torch.nn.functional.mse_loss(local(x), y).backward()
    try:
        opt.step()
        result["unsynced_error"] = ""
    except UserFacingError as exc:
        result["unsynced_error"] = str(exc)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_decisions_match_torch_gqc_replicated_on_every_rank(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for name in ("gnts", "sbc", "gns", "mht"):
        for r in results:
            assert r[name]["world"] == WORLD
            assert r[name]["mine"] == r[name]["ref"], name
            assert r[name]["params_match"], name
        assert results[0][name]["mine"] == results[1][name]["mine"]  # every rank decides the same
        assert 2 < sum(results[0][name]["mine"]) < 28, name
    # two ranks give gns two norms on the first draw: it can step on first draws (torch-gqc too)
    assert "DistributedDataParallel" in results[0]["unsynced_error"]
