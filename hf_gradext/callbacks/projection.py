"""``GradientProjectionCallback``: projected per-sample gradients from the training backward itself.

With ``--project_gradients`` the trainer gets a microbatch observer that arms the capture engine for
every training microbatch; the Kronecker projection runs inside the backward hooks (no per-sample
gradient is materialized, no extra forward/backward). Rows are buffered and written as one shard every
``--proj_save_interval`` microbatches (never dropped) and flushed at the end of training.

Index rows: ``example_id`` (the dataset's ``example_id`` column when the batch carries it, else -1),
``position`` (running sample counter of this rank), ``step`` (the optimizer step this microbatch's
gradient feeds into: ``global_step + 1`` during the window, the same convention as gradient collection),
``epoch``, ``rank``. Before each checkpoint, every row of the steps it covers is written to disk; resuming
from a checkpoint at step S first removes rows with ``step > S`` written by this rank (they are
recomputed), so no step is duplicated or missing, and ``position`` continues after the last row kept, so
positions stay unique (and equal to those of an uninterrupted run).

Directory policy (:mod:`hf_gradext.store.policy`, the same for every writer): a fresh run refuses a
directory holding another run's rows (``--overwrite_output_dir`` removes them, logged); a run resumed from
checkpoint ``S`` must find the same projection settings and, recorded at that checkpoint's save, the
fingerprint of the weights it loaded, or it is refused before the first step.

On a GPU the rows of microbatch ``k`` are copied to (pinned) host memory asynchronously and handed to the
writer while microbatch ``k + 1`` runs, so the training loop never waits for the GPU on their account.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainerCallback

from hf_gradext.callbacks.requirements import require_gradext_trainer
from hf_gradext.devices import HostCopy
from hf_gradext.grad.observer import TrainingCaptureObserver
from hf_gradext.projection.io import (
    DTYPES,
    METADATA_FILE,
    RUN_CONFIG_FILE,
    STATS_FILE,
    ProjectionShardWriter,
    list_shards,
    projection_output,
    prune_rows_from_step,
    read_shard_header,
    row_settings,
    write_json_atomic,
)
from hf_gradext.projection.projector import projector_from_args
from hf_gradext.store.policy import (
    OVERWRITE_OUTPUT_DIR,
    RESUME_FROM_CHECKPOINT,
    RunFingerprint,
    model_fingerprint,
    prepare_output_dir,
    record_model,
    training_mode,
)

logger = logging.getLogger(__name__)

WRITER = "training_projection"  # the writer named in the directory's run fingerprint
PROJ_DIR_FLAG = "--proj_output_dir"


@dataclass
class _RowsInFlight:
    """One microbatch's projected rows (and example ids) on their way to the host."""

    copy: HostCopy  # (rows (B, D), example ids or None)
    ids: list | None  # ids that were not a tensor
    n: int
    position: int
    step: int
    epoch: float


def next_position(directory: str, rank: int) -> int:
    """One past the largest ``position`` in this rank's complete shards (0 when there are none)."""
    last = -1
    for info in list_shards(directory, "proj", rank):
        rows, _ = read_shard_header(info.path)
        last = max([last, *(int(r.get("position", -1)) for r in rows)])
    return last + 1


def projection_dir(args: Any) -> str:
    """``--proj_output_dir``, defaulting to ``<output_dir>/projections``."""
    return args.proj_output_dir or os.path.join(args.output_dir, "projections")


class GradientProjectionCallback(TrainerCallback):
    """Writes projected per-sample gradients of every training microbatch (see module doc)."""

    def __init__(self, trainer: Any) -> None:
        require_gradext_trainer(trainer, type(self).__name__, "proj_rank_total")
        args = trainer.args
        self.args = args
        self.directory = projection_dir(args)
        self.output = projection_output(
            self.directory, PROJ_DIR_FLAG, OVERWRITE_OUTPUT_DIR, RESUME_FROM_CHECKPOINT
        )
        self.projector = projector_from_args(trainer.model, args)
        self.engine = self.projector.make_engine(weight_grads=True)
        self.observer = TrainingCaptureObserver(self.engine, on_done=self._on_done)
        trainer.add_microbatch_observer(self.observer)
        self.trainer = trainer
        self.writer: ProjectionShardWriter | None = None
        self.rank = int(getattr(args, "process_index", 0))
        self.position = 0
        self.microbatches = 0
        self.seconds_in_collect = 0.0
        self._in_flight: _RowsInFlight | None = None  # last microbatch's rows, on their way to the host

    # ------------------------------------------------------------------ trainer events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        mode = training_mode(args, state)
        settings = {
            **row_settings(self.projector.metadata()),
            "world_size": int(getattr(args, "world_size", 1)),
        }
        prepare_output_dir(
            self.output,
            mode,
            RunFingerprint(WRITER, settings, model_fingerprint(self.trainer.model)),
            step=state.global_step,
            rank=self.rank,
            world_size=int(getattr(args, "world_size", 1)),
        )
        if mode == "resume":  # resumed from a checkpoint: rows of re-run steps are rewritten
            removed = prune_rows_from_step(self.directory, self.rank, state.global_step + 1, PROJ_DIR_FLAG)
            if removed:
                logger.info(
                    "projection: removed %d rows of steps > %d (re-run after resume)",
                    removed,
                    state.global_step,
                )
        # Resumed: after the rows kept (unique positions, as in an uninterrupted run); else 0 (no rows left).
        self.position = next_position(self.directory, self.rank)
        if self.rank == 0:
            write_json_atomic(
                os.path.join(self.directory, METADATA_FILE), self.projector.metadata(), flag=PROJ_DIR_FLAG
            )
            write_json_atomic(
                os.path.join(self.directory, RUN_CONFIG_FILE), args.to_dict(), flag=PROJ_DIR_FLAG
            )
        self.writer = ProjectionShardWriter(
            self.directory,
            rank=self.rank,
            save_interval=args.proj_save_interval,
            dtype=DTYPES[args.proj_dtype],
        )

    def _on_done(self, engine: Any, inputs: dict[str, Any]) -> None:
        start = time.perf_counter()
        if self.writer is None:  # training_step called outside train(): nowhere to write
            raise RuntimeError("GradientProjectionCallback: on_train_begin was not called")
        rows = self.projector.collect().detach().to(self.writer.dtype)  # (B, D), on the model's device
        n = rows.shape[0]
        ids = inputs.get("example_id")
        state = self.trainer.state
        tensor_ids = ids if isinstance(ids, torch.Tensor) else None
        batch = _RowsInFlight(
            copy=HostCopy(rows, tensor_ids),
            ids=None if tensor_ids is not None else ids,
            n=n,
            position=self.position,
            step=int(state.global_step) + 1,  # the optimizer step this gradient feeds into
            epoch=float(state.epoch or 0.0),
        )
        # Write the previous microbatch's rows, not these: their copy finished long ago, so nothing here
        # waits for the GPU, and the CPU keeps queueing the next step ahead of it.
        previous, self._in_flight = self._in_flight, batch
        if previous is not None:
            self._write(previous)
        self.position += n
        self.microbatches += 1
        self.seconds_in_collect += time.perf_counter() - start

    def _write(self, batch: _RowsInFlight) -> None:
        rows, tensor_ids = batch.copy.wait()
        ids = tensor_ids.tolist() if tensor_ids is not None else batch.ids
        ids = list(ids) if ids is not None else [-1] * batch.n
        index = [
            {
                "example_id": int(ids[i]),
                "position": batch.position + i,
                "step": batch.step,
                "epoch": batch.epoch,
                "rank": self.rank,
            }
            for i in range(batch.n)
        ]
        self.writer.add(rows, index)

    def flush(self) -> None:
        """Hand the rows still in flight to the shard writer (buffered per ``--proj_save_interval``)."""
        if self._in_flight is not None:
            batch, self._in_flight = self._in_flight, None
            self._write(batch)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if control.should_save:
            self._persist()
            self._record_checkpoint(state)
        return control

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if control.should_save:  # save_strategy=epoch decides here, after the epoch's last step
            self._persist()
            self._record_checkpoint(state)
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._record_checkpoint(state)  # also for checkpoints decided after on_step_end (save_strategy=best)
        return control

    def _record_checkpoint(self, state: Any) -> None:
        """A checkpoint of this step is being saved: record its weights, so resuming from it can be checked."""
        if self.writer is not None and self.rank == 0:
            record_model(self.output, state.global_step, model_fingerprint(self.trainer.model))

    def _persist(self) -> None:
        """Every row of the steps a checkpoint is about to claim goes to disk first.

        A run killed after the checkpoint then resumes from it with no step missing (later steps are
        pruned and recomputed on resume), whatever ``--proj_save_interval`` buffers.
        """
        if self.writer is None:
            return
        self.flush()
        self.writer.write_pending()
        self.writer.writer.flush()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.writer is None:
            return
        self.flush()
        self.writer.close()
        stats = {
            "rank": self.rank,
            "microbatches": self.microbatches,
            "rows_written": self.writer.rows_written,
            "shards": len(list_shards(self.directory, "proj", self.rank)),
            "bytes_written": self.writer.writer.bytes_written,
            "seconds_collecting_rows": self.seconds_in_collect,
            "total_proj_dim": self.projector.dim,
            "global_step": state.global_step,
        }
        name = STATS_FILE if self.rank == 0 else STATS_FILE.replace(".json", f".rank{self.rank:03d}.json")
        write_json_atomic(os.path.join(self.directory, name), stats, flag=PROJ_DIR_FLAG)
        self.writer = None


def build_callback(trainer: Any) -> GradientProjectionCallback | None:
    """The projection callback when ``--project_gradients`` is set, else None."""
    if not getattr(trainer.args, "project_gradients", False):
        return None
    return GradientProjectionCallback(trainer)
