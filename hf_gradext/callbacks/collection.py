"""``PerSampleGradientCallback``: per-sample gradients collected during ``Trainer`` training.

Wiring (see ``docs/collection.md``):

* ``training`` mode: a microbatch observer arms the capture engine for the microbatches of every
  N-th optimizer step; the engine's ``on_capture`` streams each layer to the collector during the
  training backward itself (no extra forward/backward).
* ``separate`` mode: before each microbatch of a collected step (current batch), or after the step
  (``--gradient_collection_probe_file``), an own fp32 eval-mode pass that leaves ``param.grad`` alone.

Directory (``--gradient_collection_dir``, policy of :mod:`hf_gradext.store.policy`): a fresh run refuses
shards of another run (``--overwrite_output_dir`` removes them, logged); a run resumed from checkpoint
``S`` must find the same collection settings and the weights fingerprint recorded when ``S`` was saved,
then drops this rank's shards of steps after ``S`` (they are collected again).

Logs: a collected step's statistics join HF's own log entry of that step, or get one of their own when HF
does not log it (:mod:`hf_gradext.callbacks.training_logs`); HF's keys are never lost.

Step ``s`` means the s-th optimizer step (``state.global_step`` after it); training/current-batch
gradients are taken at the parameters *before* step ``s`` is applied, probe gradients *after* it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from transformers import TrainerCallback

from hf_gradext.arguments.collection import resolve_collection_dir
from hf_gradext.callbacks.requirements import require_gradext_trainer
from hf_gradext.callbacks.training_logs import extend_training_logs, log_own_entry
from hf_gradext.collection.chunking import MIB
from hf_gradext.collection.collector import StepCollector
from hf_gradext.collection.consumer import CaptureConsumer, example_ids_of
from hf_gradext.collection.memory import PeakMemoryMeter
from hf_gradext.collection.separate import probe_batch, read_probe_texts, run_separate
from hf_gradext.collection.sink import PREFIX as SHARD_PREFIX
from hf_gradext.collection.sink import GradientSink, collection_output, prune_after_step, shard_step
from hf_gradext.errors import UserFacingError
from hf_gradext.grad.capture import CaptureEngine
from hf_gradext.grad.observer import TrainingCaptureObserver
from hf_gradext.store import StoreWriteError, list_shards
from hf_gradext.store.policy import (
    OutputDirConflict,
    RunFingerprint,
    model_fingerprint,
    prepare_output_dir,
    record_model,
    training_mode,
)

logger = logging.getLogger(__name__)

PREFIX = "grad_collection"
WRITER = "gradient_collection"  # the writer named in the directory's run fingerprint


class PerSampleGradientCallback(TrainerCallback):
    """Collects per-sample gradients every ``--gradient_collection_steps`` optimizer steps.

    Built by :func:`build_callback`; the layer selection is resolved (and fails, naming the flag) when
    the callback is built, i.e. in ``GradExtTrainer.__init__``, before any training step.
    """

    def __init__(self, trainer: Any) -> None:
        require_gradext_trainer(trainer, type(self).__name__, "gradient_collection_steps")
        self.trainer = trainer
        args = trainer.args
        self.args = args
        self.every = args.gradient_collection_steps
        self.max_samples = args.gradient_collection_max_samples
        self.mode = args.gradient_collection_mode
        self.save = args.gradient_collection_save
        self.on_error = args.gradient_collection_on_error
        self.rank = int(getattr(args, "process_index", 0))
        self.directory = resolve_collection_dir(args)
        self.output = collection_output(self.directory)
        self.use_loop = args.gradient_collection_method == "loop"
        model = trainer.model
        self.engine = build_collection_engine(args, model)
        self.meter = PeakMemoryMeter(args.device if torch.cuda.is_available() else "cpu")
        self.collector = StepCollector(
            self.save,
            None,
            {},
            {},
            dtype=args.gradient_collection_dtype,
            budget_bytes=int(args.gradient_collection_memory_budget_mb * MIB),
            chunk_size=args.gradient_collection_chunk_size,
            rank=self.rank,
            meter=self.meter,
        )
        self.consumer = CaptureConsumer(model, self.engine.modules, self.engine.specs, self.collector)
        self.collector.groups = self.consumer.groups
        self.collector.param_shapes = self.consumer.param_shapes
        self.engine.on_capture = self._on_capture
        if self.use_loop:
            self.engine.remove()  # the loop baseline needs no hooks
        self.probe_texts = (
            read_probe_texts(args.gradient_collection_probe_file)
            if args.gradient_collection_probe_file
            else None
        )
        self.observer = TrainingCaptureObserver(
            self.engine, should_capture=self._should_capture, on_done=self._captured
        )
        self.sink: GradientSink | None = None
        self.enabled = True
        self._step: int | None = None  # the optimizer step being collected
        self._microbatch = 0
        self._probe: dict[str, Any] | None = None
        self._pending: tuple[int, dict[str, float]] | None = None  # (step, statistics) not yet logged
        extend_training_logs(trainer, self._merge_pending)

    # ------------------------------------------------------------------ schedule
    def _is_collect_step(self, step: int) -> bool:
        return self.enabled and step % self.every == 0

    def _begin_if_needed(self, step: int) -> bool:
        if not self._is_collect_step(step):
            return False
        if self._step != step:
            self._step, self._microbatch = step, 0
            self.collector.begin_step(step)
        return True

    def _take(self, inputs: dict[str, Any]) -> int:
        batch = int(inputs["input_ids"].shape[0])
        return max(0, min(batch, self.max_samples - self.collector.num_samples))

    def _ids(self, inputs: dict[str, Any], n: int) -> list[Any]:
        # Without an example_id column: (step, microbatch, row) identifies the sample.
        fallback = [f"{self._step}:{self._microbatch}:{j}" for j in range(n)]
        if self.save == "stats":
            # Statistics name no sample, and reading a device tensor here would make the CPU wait for
            # the GPU before every collected forward.
            return fallback
        return example_ids_of(inputs, n, fallback)

    # ------------------------------------------------------------------ training mode (observer)
    def _should_capture(self, trainer: Any, inputs: dict[str, Any]) -> bool:
        if self.mode != "training" or not self._begin_if_needed(trainer.state.global_step + 1):
            return False
        n = self._take(inputs)
        if n == 0:
            return False
        self.consumer.begin_microbatch(self._ids(inputs, n))
        return True

    def _on_capture(self, name: str, module: Any, a: torch.Tensor, g: torch.Tensor) -> None:
        # Runs inside the backward: a write failure surfacing here must follow --..._on_error too.
        self._guard(self.consumer.on_capture, name, module, a, g)

    def _captured(self, engine: Any, inputs: dict[str, Any]) -> None:
        self._guard(self.consumer.finish_microbatch)
        self._microbatch += 1

    # ------------------------------------------------------------------ separate mode (current batch)
    def before_microbatch(self, trainer: Any, inputs: dict[str, Any], num_items_in_batch: Any) -> None:
        if self.mode == "training":
            self.observer.before_microbatch(trainer, inputs, num_items_in_batch)
            return
        if self.probe_texts is not None or not self._begin_if_needed(trainer.state.global_step + 1):
            return
        n = self._take(inputs)
        if n > 0:
            from hf_gradext.integrations.trainer import prepare_inputs

            batch = prepare_inputs(trainer, inputs)
            engine = None if self.use_loop else self.engine
            self._guard(run_separate, trainer.model, batch, n, self.consumer, engine, self._ids(inputs, n))
        self._microbatch += 1

    def after_microbatch(self, trainer: Any, inputs: dict[str, Any], loss: torch.Tensor) -> None:
        if self.mode == "training":
            self.observer.after_microbatch(trainer, inputs, loss)

    # ------------------------------------------------------------------ TrainerCallback
    def on_train_begin(self, args, state, control, **kwargs):
        if self.save == "stats" or self.sink is not None:
            return
        try:
            mode = training_mode(args, state)
            prepare_output_dir(
                self.output,
                mode,
                RunFingerprint(WRITER, self._settings(), model_fingerprint(self.trainer.model)),
                step=state.global_step,
                rank=self.rank,
                world_size=int(getattr(args, "world_size", 1)),
            )
            if mode == "resume":
                # Steps after the checkpoint we resume from will be redone: drop what was collected for them.
                prune_after_step(self.directory, self.rank, state.global_step)
                self._warn_missing(state.global_step)
            self.sink = GradientSink(
                self.directory,
                self.rank,
                target_shard_bytes=min(256 * MIB, max(MIB, self.collector.budget_bytes)),
            )
        except OutputDirConflict:
            raise  # another run's rows: a choice for the user, not a write failure --..._on_error may hide
        except (UserFacingError, OSError) as exc:
            self._fail(exc)
        self.collector.sink = self.sink

    def _settings(self) -> dict[str, Any]:
        """Everything that determines the rows (a resumed run must match; see store/policy.py)."""
        args = self.args
        probe = args.gradient_collection_probe_file
        return {
            "layers": sorted(self.engine.modules),
            "save": self.save,
            "dtype": args.gradient_collection_dtype,
            "mode": self.mode,
            "steps": self.every,
            "max_samples": self.max_samples,
            "probe_file": os.path.abspath(probe) if probe else None,
            "world_size": int(getattr(args, "world_size", 1)),
        }

    def _record_checkpoint(self, state: Any) -> None:
        """A checkpoint of this step is being saved: record its weights, so resuming from it can be checked."""
        if self.sink is not None and self.rank == 0:
            record_model(self.output, state.global_step, model_fingerprint(self.trainer.model))

    def on_save(self, args, state, control, **kwargs):
        self._record_checkpoint(state)  # also for checkpoints decided after on_step_end (save_strategy=best)

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if self.probe_texts is not None and self._begin_if_needed(step):
            self._guard(self._collect_probe)
        self._deliver_stale(control, before_step=step)
        if self._step == step and self.enabled:
            metrics = self._guard(self.collector.end_step, PREFIX)
            self._step = None
            if metrics:
                metrics[f"{PREFIX}/bytes_written_mb"] = (self.sink.bytes_written / MIB) if self.sink else 0.0
                metrics[f"{PREFIX}/step"] = step
                if control.should_log:  # HF logs this step right after on_step_end: join its entry
                    self._pending = (step, metrics)
                else:
                    log_own_entry(self.trainer, control, metrics)
        if control.should_save and self.sink is not None and self.enabled:
            # Everything up to this step must be on disk before the checkpoint claims it.
            self._guard(self.sink.flush)
            self._record_checkpoint(state)
        return control

    # ------------------------------------------------------------------ statistics into the logs
    # HF logs a step right after on_step_end when control.should_log is set: the statistics then join that
    # entry (through the trainer's log, see callbacks/training_logs.py), so loss, grad_norm, learning rate,
    # throughput and gqc/* stay in it. A step HF does not log gets an entry of its own, at its own step.
    # Statistics whose step HF was expected to log but did not (a later callback cleared should_log) are
    # delivered at the next step end, or at train end: they are never dropped.
    def _merge_pending(self) -> dict[str, float]:
        if self._pending is None or self._pending[0] != self.trainer.state.global_step:
            return {}
        (_, metrics), self._pending = self._pending, None
        return metrics

    def _deliver_stale(self, control: Any, before_step: int | None = None) -> None:
        """Log pending statistics as an entry of their own (those of steps before ``before_step`` only)."""
        if self._pending is not None and (before_step is None or self._pending[0] < before_step):
            (_, metrics), self._pending = self._pending, None
            log_own_entry(self.trainer, control, metrics)

    def on_epoch_end(self, args, state, control, **kwargs):
        # save_strategy=epoch decides to save here, after the last on_step_end of the epoch.
        if control.should_save and self.sink is not None and self.enabled:
            self._guard(self.sink.flush)
            self._record_checkpoint(state)
        return control

    def _warn_missing(self, step: int) -> None:
        if step <= 0 or self.save == "stats":
            return
        have = {shard_step(info.path) for info in list_shards(self.directory, SHARD_PREFIX, self.rank)}
        missing = [s for s in range(self.every, step + 1, self.every) if s not in have]
        if missing:
            logger.warning(
                "resuming at step %d: no collected gradients on disk for steps %s (collection was off, "
                "failed, or shards were removed)",
                step,
                missing[:20],
            )

    def on_train_end(self, args, state, control, **kwargs):
        self._deliver_stale(control)
        if self.sink is not None and self.enabled:
            self._guard(self.sink.close)
        self.engine.remove()

    # ------------------------------------------------------------------ probe
    def _collect_probe(self) -> None:
        model = self.trainer.model
        if self._probe is None:
            assert self.probe_texts is not None
            config = getattr(model, "config", None)
            max_len = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024)
            tokenizer = getattr(self.trainer, "processing_class", None)
            device = next(model.parameters()).device
            self._probe = probe_batch(self.probe_texts[: self.max_samples], tokenizer, max_len, device)
        n = int(self._probe["input_ids"].shape[0])
        ids = self._probe["example_id"].tolist()
        run_separate(model, self._probe, n, self.consumer, None if self.use_loop else self.engine, ids)

    # ------------------------------------------------------------------ faults
    def _guard(self, fn: Any, *fn_args: Any) -> Any:
        if not self.enabled:
            return None
        try:
            return fn(*fn_args)
        except StoreWriteError as exc:
            self._fail(exc)
            return None

    def _fail(self, exc: Exception) -> None:
        if self.on_error == "raise":
            raise exc
        logger.warning("gradient collection disabled, training continues: %s", exc)
        self.enabled = False
        self._step = None
        if self.sink is not None:
            self.sink.discard()
        self.engine.remove()


class _ObserverAdapter:
    """The callback as a ``MicrobatchObserver`` (the trainer calls it around each microbatch)."""

    def __init__(self, callback: PerSampleGradientCallback) -> None:
        self.callback = callback

    def before_microbatch(self, trainer: Any, inputs: dict[str, Any], num_items_in_batch: Any) -> None:
        self.callback.before_microbatch(trainer, inputs, num_items_in_batch)

    def after_microbatch(self, trainer: Any, inputs: dict[str, Any], loss: torch.Tensor) -> None:
        self.callback.after_microbatch(trainer, inputs, loss)


def build_collection_engine(args: Any, model: torch.nn.Module) -> CaptureEngine:
    """The capture engine ``--gradient_collection_layers`` selects on ``model``.

    Raises:
        UserFacingError: the selection matches nothing or an unsupported module (names the flag).
    """
    try:
        return CaptureEngine(
            model,
            args.gradient_collection_layers,
            on_capture=None,
            keep=False,
            weight_grads=args.gradient_collection_mode == "training",  # separate: a pure measurement pass
        )
    except UserFacingError as exc:
        raise UserFacingError(
            f"--gradient_collection_layers={args.gradient_collection_layers}: {exc}"
        ) from None


def build_callback(trainer: Any) -> PerSampleGradientCallback | None:
    """Return the callback the trainer's args ask for, or None."""
    if not getattr(trainer.args, "collect_gradients", False):
        return None
    # GradExtTrainer keeps the dataset's example_id column in the batch for us (and away from the model).
    callback = PerSampleGradientCallback(trainer)
    trainer.add_microbatch_observer(_ObserverAdapter(callback))
    return callback
