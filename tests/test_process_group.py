import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hf_gradext.process_group import end_process_group


def _gloo_threads() -> list[str]:
    tasks = Path(f"/proc/{os.getpid()}/task")
    return [n for n in (p.joinpath("comm").read_text().strip() for p in tasks.iterdir()) if "gloo" in n]


def test_no_group_is_a_noop():
    assert not dist.is_initialized()
    assert end_process_group() is False


def test_destroys_the_group_and_frees_gloo_threads_held_by_a_cycle(tmp_path):
    if not Path("/proc/self/task").is_dir():
        pytest.skip("thread names need Linux /proc")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)

    class Holder:  # a cycle, like a Trainer and its callbacks, keeps the DDP wrapper alive
        pass

    holder = Holder()
    holder.self, holder.model = holder, torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
    del holder
    assert _gloo_threads()  # the group's worker threads run
    assert end_process_group() is True
    assert not dist.is_initialized()
    assert _gloo_threads() == []  # they would otherwise outlive the interpreter and abort the exit
