"""Launched by ``test_gqc_ddp_uneven.py`` under ``accelerate launch``: GQC on a stream that ends unevenly.

Each rank iterates its own copy of a one-pass ``IterableDataset`` whose length depends on the rank
(``RANK`` from the launcher). With ``dispatch_batches=False`` accelerate wraps it in an
``IterableDatasetShard`` per rank (rank r keeps its slice of every ``world * B`` samples of *its own*
stream), so rank 0 sees ``LONG // (2 * B)`` microbatches and rank 1 only ``SHORT // (2 * B)``: the
shorter rank's iterator ends first. A second pass yields nothing (a consumed stream).

Usage: ``python gqc_uneven_script.py OUT_DIR``; writes ``OUT_DIR/rank{r}.json``.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch.utils.data import IterableDataset

from hf_gradext.arguments import GradExtArguments
from hf_gradext.process_group import end_process_group
from hf_gradext.trainer import GradExtTrainer
from tests.helpers import make_tiny_gpt2

BATCH = 2
LONG, SHORT = 48, 28  # samples per rank's stream: 12 vs 7 microbatches of 2 per rank (2 ranks)
SEQ, VOCAB = 16, 64


class RankStream(IterableDataset):
    """A one-pass stream: ``LONG`` samples on rank 0, ``SHORT`` on the others; empty once consumed."""

    def __init__(self) -> None:
        self.rank = int(os.environ.get("RANK", "0"))
        self.passes = 0
        self.drawn = 0  # samples this rank's stream handed out (the dataloader holds this object)

    def __iter__(self):
        self.passes += 1
        if self.passes > 1:
            return
        g = torch.Generator().manual_seed(100 + self.rank)
        for i in range(LONG if self.rank == 0 else SHORT):
            ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
            labels = ids.clone()
            labels[: (i * 3) % 12] = -100  # ragged label-token counts
            self.drawn += 1
            yield {"input_ids": ids, "labels": labels}


def main(out: str) -> None:
    model = make_tiny_gpt2(vocab_size=VOCAB, n_positions=SEQ)
    args = GradExtArguments(
        output_dir=out,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-3,
        max_steps=1000,  # HF needs a bound for an unsized dataset; the stream ends long before
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        accelerator_config={"dispatch_batches": False},  # each rank reads its own stream
        gqc="gnts",
        gqc_threshold_start=1.1,
        gqc_max_microbatches=4,
        gqc_microbatch_budget=1000,  # larger than either stream: only the data stops the run
        max_grad_norm=1.0,
        ddp_find_unused_parameters=False,  # every parameter gets a gradient; skips DDP's graph walk
    )
    stream = RankStream()
    trainer = GradExtTrainer(model, args=args, train_dataset=stream)
    trainer.train()
    history = trainer.state.log_history
    steps = [
        [e["step"], e["gqc/microbatches"], round(e["gqc/grad_norm"], 6), e["gqc/window_tokens"]]
        for e in history
        if "gqc/microbatches" in e
    ]
    summary = next(e for e in history if "train_runtime" in e)
    checksum = float(sum(p.detach().double().sum() for p in trainer.model.parameters()))
    result = {
        "steps": steps,
        "total_microbatches": summary["gqc/total_microbatches"],
        "forced": summary.get("gqc/total_forced_steps"),
        "checksum": checksum,
        "world": args.world_size,
        "drawn": stream.drawn,
        "passes": stream.passes,
    }
    with open(os.path.join(out, f"rank{args.process_index}.json"), "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(sys.argv[1])
    end_process_group()  # after main: the trainer (and its DDP wrapper holding gloo's threads) is gone
