"""HostSyncCounter counts value reads of tensors and nothing else."""

from __future__ import annotations

import torch

from hf_gradext.patches.sync_count import HostSyncCounter


def test_counts_value_reads_only():
    x = torch.arange(4.0)
    with HostSyncCounter() as counter:
        y = (x * 2).sum()  # device work: not a sync
        assert counter.count == 0
        if y > 0:  # __bool__
            pass
        y.item()
        x.tolist()
        int(y)
        float(y)
        torch.equal(x, x)
    assert counter.count == 6
    assert counter.by_name["item"] == 1 and counter.by_name["__bool__"] == 1
