"""Launched by ``test_ddp_oracle.py`` under ``accelerate launch``: runs whose results the test checks
against single-process / float64-loop oracles.

One launch trains several tiny float64 GPT-2 runs in a row (one process group, so the ~10 s launcher
start-up is paid once). Every run writes, per rank, into ``OUT_DIR/<run>/``:

* ``rank{r}.json``: per optimizer step ``[step, microbatches, tested norm, window label tokens]``, and per
  microbatch ``[step, example ids]`` (the samples this rank drew for that step);
* ``rank{r}_final.safetensors``: the final parameters;
* ``rank{r}_before_step{s}.safetensors``: the parameters at the start of each collected step ``s``;
* ``gradients/``: the per-sample gradients the collection callback captured (runs with collection on).

The run configurations live in :data:`RUNS` and are built by :func:`make_args`, which the test also uses
for its single-process oracle runs, so both sides train with exactly the same flags.

Usage: ``python -m tests.distributed.ddp_oracle_script OUT_DIR [RUN ...]`` (default: all of ``RUNS``).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback

from hf_gradext.arguments import GradExtArguments
from hf_gradext.process_group import end_process_group
from hf_gradext.trainer import GradExtTrainer
from tests.helpers import make_tiny_gpt2

SEQ, VOCAB, NUM_ROWS = 16, 64, 64
RANK_BATCH = 2  # per-device microbatch under DDP; the single-process oracle draws WORLD * RANK_BATCH
COLLECT_EVERY = 2  # collected optimizer steps: 2, 4, ...

_GQC = dict(
    gqc="gnts",
    gqc_threshold_start=0.75,  # one-microbatch norms are ~1, mean norms of 2-3 ~0.6-0.8: k is 1, 2 or 3
    gqc_max_microbatches=4,
    max_grad_norm=0.7,  # clips some steps, not all: clipping must act on the final global mean
)
_COLLECT = dict(
    collect_gradients=True,
    gradient_collection_mode="training",
    gradient_collection_steps=COLLECT_EVERY,
    gradient_collection_max_samples=8,  # a whole GQC window (<= 4 microbatches of 2) per rank
    gradient_collection_save="full",
    gradient_collection_layers="all",
)
# name -> GradExtArguments overrides. SGD (not Adam) so that the weights follow the gradient's scale:
# a world-size factor that is off by 2 moves the weights instead of being normalized away.
RUNS: dict[str, dict[str, Any]] = {
    # GQC, HF's default token averaging across devices (loss x world, DDP averages); collection on.
    "gqc_avg": dict(**_GQC, **_COLLECT, average_tokens_across_devices=True),
    # GQC without it (each rank's loss is its own token sum; DDP averages): the other scaling path.
    "gqc_noavg": dict(**_GQC, average_tokens_across_devices=False),
    # HF's own fixed accumulation (2 microbatches per step), num_items_in_batch over both ranks.
    "ga_avg": dict(**_COLLECT, gradient_accumulation_steps=2, max_grad_norm=0.0),
}


def make_rows() -> list[dict[str, torch.Tensor]]:
    """``NUM_ROWS`` fixed-length rows with ragged label counts (a masked prefix) and an ``example_id``."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(NUM_ROWS):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        labels = ids.clone()
        labels[: (i * 5) % 13] = -100  # 3..16 loss targets (after the causal shift): ranks differ
        rows.append({"input_ids": ids, "labels": labels, "example_id": torch.tensor(i)})
    return rows


def make_model():
    """The tiny GPT-2 every run starts from, in float64 (so the oracle comparison can be tight)."""
    return make_tiny_gpt2(vocab_size=VOCAB, n_positions=SEQ, dtype=torch.float64, perturb=0.1, training=True)


def make_args(out: str, run: str, per_device_batch: int) -> GradExtArguments:
    return GradExtArguments(
        output_dir=out,
        per_device_train_batch_size=per_device_batch,
        optim="sgd",
        learning_rate=0.5,
        num_train_epochs=1,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        remove_unused_columns=False,  # keep example_id in every run (the trainer strips it before the forward)
        ddp_find_unused_parameters=False,  # every parameter gets a gradient; skips DDP's graph walk
        **RUNS[run],
    )


def params_of(model) -> dict[str, torch.Tensor]:
    """A detached copy of the parameters (tied weights once, under their ``named_parameters`` name)."""
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters()}


class Recorder(TrainerCallback):
    """Microbatch observer + callback: the ids each microbatch drew, and weights before collected steps."""

    def __init__(self, out: str, rank: int, collect: bool) -> None:
        self.out, self.rank, self.collect = out, rank, collect
        self.microbatches: list[list[Any]] = []
        self.trainer: GradExtTrainer | None = None

    def before_microbatch(self, trainer, inputs, num_items_in_batch) -> None:
        self.microbatches.append([trainer.state.global_step + 1, inputs["example_id"].tolist()])

    def after_microbatch(self, trainer, inputs, loss) -> None:
        pass

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step + 1
        if self.collect and step % COLLECT_EVERY == 0:
            path = os.path.join(self.out, f"rank{self.rank}_before_step{step}.safetensors")
            save_file(params_of(self.trainer.model), path)
        return control


def run_one(out: str, run: str, per_device_batch: int) -> GradExtTrainer:
    """Train ``run`` (on every rank of the current launch, or in one process) and write its results."""
    os.makedirs(out, exist_ok=True)
    args = make_args(out, run, per_device_batch)
    model = make_model()
    trainer = GradExtTrainer(model, args=args, train_dataset=make_rows())
    rank = int(args.process_index)
    recorder = Recorder(out, rank, bool(RUNS[run].get("collect_gradients")))
    recorder.trainer = trainer
    trainer.add_callback(recorder)
    trainer.add_microbatch_observer(recorder)
    trainer.train()
    history = trainer.state.log_history
    if args.gqc != "none":
        steps = [
            [e["step"], e["gqc/microbatches"], e["gqc/grad_norm"], e["gqc/window_tokens"]]
            for e in history
            if "gqc/microbatches" in e
        ]
    else:
        steps = [[e["step"], None, e.get("grad_norm"), None] for e in history if "loss" in e]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(
            {"steps": steps, "microbatches": recorder.microbatches, "world": args.world_size}, fh, indent=0
        )
    save_file(params_of(trainer.model), os.path.join(out, f"rank{rank}_final.safetensors"))
    return trainer


def main(out: str, runs: list[str]) -> None:
    for run in runs:
        trainer = run_one(os.path.join(out, run), run, RANK_BATCH)
        del trainer  # the DDP wrapper owns gloo's threads; drop it before the next run / the group's end


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or list(RUNS))
    end_process_group()
