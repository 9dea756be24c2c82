"""2-process CPU GQC run where one rank's data ends first: both ranks stop together, no hang.

Prepared map-style dataloaders pad ranks to equal length, so the uneven path needs an iterable
dataset read per rank (``dispatch_batches=False``); see ``gqc_uneven_script.py`` for the setup.
"""

from __future__ import annotations

import json

import pytest
import torch

from hf_gradext.arguments import GradExtArguments
from hf_gradext.trainer import GradExtTrainer
from tests.distributed.gqc_uneven_script import BATCH, LONG, SHORT
from tests.helpers import accelerate_launch, make_tiny_gpt2

WORLD = 2


@pytest.mark.slow
@pytest.mark.distributed
def test_gqc_ranks_stop_together_when_one_stream_ends_first(tmp_path):
    # A hang (a rank waiting in a collective, or endless empty epochs) fails here as a timeout.
    proc = accelerate_launch(["-m", "tests.distributed.gqc_uneven_script", str(tmp_path)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world"] == WORLD
    short_supply = SHORT // (BATCH * WORLD)  # microbatches the shorter rank can supply: 7
    assert short_supply < LONG // (BATCH * WORLD)
    # The data really was uneven: rank 1 drained its stream, rank 0 still had samples left.
    assert r1["drawn"] == SHORT
    assert SHORT < r0["drawn"] < LONG
    # Identical decisions (microbatches per step, norms, window tokens) and weights on both ranks.
    assert r0["steps"] == r1["steps"] and len(r0["steps"]) >= 2
    assert any(s[1] > 1 for s in r0["steps"])  # some windows accumulated
    assert r0["checksum"] == pytest.approx(r1["checksum"], rel=1e-9)
    # Everything the shorter rank could supply was trained on, nothing more; the last window was forced.
    assert sum(s[1] for s in r0["steps"]) == short_supply
    assert r0["total_microbatches"] == r1["total_microbatches"] == short_supply
    assert r0["forced"] == r1["forced"] == 1
    # The consumed one-pass stream gave an empty second epoch, which ended training (no endless epochs).
    assert r0["passes"] == r1["passes"] == 2


class _OnePassStream(torch.utils.data.IterableDataset):
    """Six samples on the first pass, nothing after; fails loudly instead of looping forever."""

    def __init__(self) -> None:
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        if self.passes > 3:
            raise RuntimeError("the trainer kept starting epochs on a consumed stream")
        if self.passes == 1:
            g = torch.Generator().manual_seed(0)
            for _ in range(6):
                ids = torch.randint(0, 64, (16,), generator=g)
                yield {"input_ids": ids, "labels": ids.clone()}


def test_single_process_gqc_stops_on_an_empty_epoch(tmp_path):
    stream = _OnePassStream()
    args = GradExtArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1000, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, dataloader_pin_memory=False, gqc="sbc",
        gqc_threshold_start=4, gqc_microbatch_budget=1000, accelerator_config={"dispatch_batches": False},
    )  # fmt: skip
    trainer = GradExtTrainer(make_tiny_gpt2(vocab_size=64, n_positions=16), args=args, train_dataset=stream)
    trainer.train()
    assert stream.passes == 2  # the data pass, then one empty epoch that ends training
    assert trainer._gqc_run.core.totals["microbatches"] == 3
    assert trainer.state.global_step == 2  # windows of 2 microbatches (4 samples), then the forced last one
