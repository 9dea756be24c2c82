"""``GradExtTrainer``: a thin ``transformers.Trainer`` subclass.

It owns four things and nothing else:

* the GQC step loop (delegated to :mod:`hf_gradext.gqc.loop` when ``args.gqc != "none"``);
* *microbatch observers*: objects called right before and right after each microbatch's
  forward/backward inside ``training_step`` (the per-sample gradient engine arms its hooks here so
  numbers come out of the training backward itself);
* attaching the feature callbacks (throughput, gradient collection, projection) that the
  ``GradExtArguments`` flags switch on;
* bookkeeping batch columns (``example_id``): kept in the batch for the microbatch observers when a
  per-sample consumer is on, and stripped before every model forward (training, evaluation,
  prediction), since the model must never see them;
* checkpoints it can trust: each save records the checksums of its files (:mod:`hf_gradext.checkpoints`),
  a resume verifies them first, a save that fails on a full / read-only disk is one line naming
  ``--output_dir`` (the half-written folder removed), and a run resumed at or past ``--max_steps`` takes no
  further step (HF's loop would take one before checking).

The private Trainer internals this needs (``_signature_columns``, the GQC hooks) go through
:mod:`hf_gradext.integrations.trainer`; with ``--gqc`` on, construction checks that transformers still
calls every overridden hook (and refuses DeepSpeed / FSDP), and every training microbatch checks that it
runs inside the GQC loop.

``GradExtSFTTrainer`` (TRL's ``SFTTrainer`` with all of the above, docs/trl.md) is built on first access
of ``hf_gradext.trainer.GradExtSFTTrainer``: importing this module does not import trl.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
from typing import Any, Protocol

import torch
from torch import nn
from transformers import Trainer

from hf_gradext.errors import UserFacingError
from hf_gradext.integrations import trainer as trainer_internals
from hf_gradext.store.disk import DiskError, disk_error, is_disk_error

logger = logging.getLogger(__name__)

# "module:function" factories; each takes the trainer and returns a TrainerCallback or None.
# Kept as strings so a feature module is imported only when the trainer is built.
CALLBACK_FACTORIES: tuple[str, ...] = (
    "hf_gradext.callbacks.throughput:build_callback",
    "hf_gradext.callbacks.collection:build_callback",
    "hf_gradext.callbacks.projection:build_callback",
    "hf_gradext.callbacks.gqc_progress:build_callback",
)

# Dataset columns that name a sample for the per-sample consumers but are no model input. HF's
# ``remove_unused_columns`` would drop them; GradExtTrainer keeps them for the observers and strips them
# before the forward (unless the model's forward itself takes one).
BOOKKEEPING_COLUMNS: tuple[str, ...] = ("example_id",)


class MicrobatchObserver(Protocol):
    """Called around every microbatch of training (forward + backward)."""

    def before_microbatch(
        self, trainer: GradExtTrainer, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None
    ) -> None: ...

    def after_microbatch(
        self, trainer: GradExtTrainer, inputs: dict[str, Any], loss: torch.Tensor
    ) -> None: ...


class GradExtTrainer(Trainer):
    """HF ``Trainer`` with GQC, per-sample gradient capture and projection plumbing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._gqc_on:
            from hf_gradext.gqc.run import check_supported

            check_supported(self)  # backend + the overridden hooks, before any training work
        self._gqc_run = None
        self._microbatch_observers: list[MicrobatchObserver] = []
        self._strip_keys = self._bookkeeping_keys_to_strip()
        for spec in CALLBACK_FACTORIES:
            module_name, func_name = spec.split(":")
            callback = getattr(importlib.import_module(module_name), func_name)(self)
            if callback is not None:
                self.add_callback(callback)
        if self._per_sample_on:
            self._keep_bookkeeping_columns()

    # ------------------------------------------------------------------ bookkeeping columns
    @property
    def _per_sample_on(self) -> bool:
        """Whether a consumer of per-sample example ids (collection, projection) is switched on."""
        return bool(
            getattr(self.args, "collect_gradients", False) or getattr(self.args, "project_gradients", False)
        )

    def _bookkeeping_keys_to_strip(self) -> tuple[str, ...]:
        """``BOOKKEEPING_COLUMNS`` the model's forward does not take (computed before any column is added)."""
        columns = trainer_internals.signature_columns(self)
        return tuple(k for k in BOOKKEEPING_COLUMNS if k not in columns)

    def _keep_bookkeeping_columns(self) -> None:
        """Let ``example_id`` through ``remove_unused_columns`` so the microbatch observers see it."""
        columns = trainer_internals.signature_columns(self)  # HF's live list: appending keeps the column
        for key in self._strip_keys:
            if key not in columns:
                columns.append(key)

    def _model_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """``inputs`` without the bookkeeping columns (the same dict when it has none)."""
        if not any(k in inputs for k in self._strip_keys):
            return inputs
        return {k: v for k, v in inputs.items() if k not in self._strip_keys}

    # ------------------------------------------------------------------ microbatch observers
    def add_microbatch_observer(self, observer: MicrobatchObserver) -> None:
        self._microbatch_observers.append(observer)

    def remove_microbatch_observer(self, observer: MicrobatchObserver) -> None:
        self._microbatch_observers.remove(observer)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """HF's ``train``; ``resume_from_checkpoint=True`` takes the newest checkpoint that finished saving.

        (transformers would take the newest ``checkpoint-*`` folder, even one a killed run left half-written.)
        """
        if resume_from_checkpoint is True:
            from hf_gradext.checkpoints import newest_complete_checkpoint

            resume_from_checkpoint = newest_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint found in output directory ({self.args.output_dir})")
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            from hf_gradext.checkpoints import verify_checkpoint

            verify_checkpoint(resume_from_checkpoint, gqc=self._gqc_on)  # before anything is loaded from it
        self._gqc_run = None  # built anew by this call's set_initial_training_values (the loop checks it)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        if self._gqc_on:
            from hf_gradext.gqc.loop import check_in_gqc_loop

            check_in_gqc_loop(self)  # before the backward: a bypassed GQC loop must not train at all
        # Observers see the full batch (example ids included); the model sees model inputs only.
        for observer in self._microbatch_observers:
            observer.before_microbatch(self, inputs, num_items_in_batch)
        loss = super().training_step(model, self._model_inputs(inputs), num_items_in_batch)
        for observer in self._microbatch_observers:
            observer.after_microbatch(self, inputs, loss)
        return loss

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any):
        # Also reached directly (subclasses, evaluation with labels): never forward bookkeeping columns.
        return super().compute_loss(model, self._model_inputs(inputs), *args, **kwargs)

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any):
        # Evaluation batches carry example_id too when it was kept for training; the model must not see it.
        return super().prediction_step(model, self._model_inputs(inputs), *args, **kwargs)

    # ------------------------------------------------------------------ GQC
    # With --gqc none none of these change anything: each one falls through to HF's method.
    # The logic lives in hf_gradext.gqc.run (sizes, checkpoint state, logs) and .loop (the epoch).
    @property
    def _gqc_on(self) -> bool:
        return getattr(self.args, "gqc", "none") not in (None, "none")

    def _run_epoch(self, *args: Any, **kwargs: Any):
        if self._gqc_on:
            from hf_gradext.gqc.loop import run_gqc_epoch

            return run_gqc_epoch(self, *args, **kwargs)
        if 0 < self.state.max_steps <= self.state.global_step:
            # Resumed from a checkpoint at (or past) --max_steps: HF's epoch loop would take a step before
            # its first max_steps check.
            logger.info(
                "global step %d reached --max_steps %d: no step taken",
                self.state.global_step,
                self.state.max_steps,
            )
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def set_initial_training_values(self, args, dataloader):
        if self._gqc_on:
            from hf_gradext.gqc.run import initial_training_values

            return initial_training_values(self, args, dataloader)
        return super().set_initial_training_values(args, dataloader)

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume, trial):
        out = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume, trial
        )
        if self._gqc_on:
            from hf_gradext.gqc.run import restore_position

            return restore_position(self, resume)  # data position from gqc_state.json, not global_step
        return out

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        run = self._gqc_run
        if self._gqc_on and run is not None:
            num_training_steps = run.horizon  # LR horizon in microbatches of data, not optimizer steps
        return super().create_scheduler(num_training_steps, optimizer)

    def _save_checkpoint(self, model, trial) -> None:
        from hf_gradext.checkpoints import write_manifest

        folder = os.path.join(
            trainer_internals.output_dir(self, trial), f"checkpoint-{self.state.global_step}"
        )
        try:
            if self._gqc_on:
                from hf_gradext.gqc.run import save_state

                save_state(self, trial)
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                write_manifest(folder)
        except DiskError:
            self._discard_checkpoint(folder)
            raise
        except Exception as exc:  # torch: RuntimeError "file write failed"; safetensors: IoError; OSError
            if not is_disk_error(exc):
                raise
            self._discard_checkpoint(folder)
            error = disk_error(
                self.args.output_dir, "--output_dir", exc, f"saving {os.path.basename(folder)} to"
            )
            raise DiskError(f"{error} (earlier checkpoints are intact)") from exc

    def _discard_checkpoint(self, folder: str) -> None:
        """Remove a checkpoint folder whose save failed: incomplete, it only holds the space the run needs."""
        if self.args.should_save and os.path.isdir(folder):
            shutil.rmtree(folder, ignore_errors=True)
            logger.warning("removed %s: its save failed", folder)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._gqc_on:
            from hf_gradext.gqc.run import decorate_logs

            decorate_logs(self, logs)
        super().log(logs, *args, **kwargs)


# ------------------------------------------------------------------------------------------ TRL SFTTrainer
def __getattr__(name: str) -> Any:
    # GradExtSFTTrainer subclasses trl.SFTTrainer. It is built on first access, so importing this module
    # (GradExtTrainer, ``import hf_gradext``) never imports trl.
    if name == "GradExtSFTTrainer":
        cls = _build_sft_trainer()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _build_sft_trainer() -> type:
    from trl import SFTTrainer

    from hf_gradext.arguments import sft as sft_arguments
    from hf_gradext.integrations import trl as trl_integration

    class GradExtSFTTrainer(GradExtTrainer, SFTTrainer):
        """TRL's ``SFTTrainer`` with hf_gradext's GQC, per-sample gradients and projection (docs/trl.md).

        Takes ``SFTTrainer``'s arguments, with a :class:`~hf_gradext.arguments.sft.GradExtSFTConfig` as
        ``args``. With ``--collect_gradients`` / ``--project_gradients`` on, a train dataset without an
        ``example_id`` column gets one (its row index) before TRL prepares it, and the collator keeps it
        in the batch. Packing and padding-free are refused then (several examples per row), and so are
        layer selections that include the LM head or an embedding tied to it in the training backward
        (TRL's fused LM head never calls the ``lm_head`` module).
        """

        def __init__(
            self,
            model: Any,
            args: Any = None,
            data_collator: Any = None,
            train_dataset: Any = None,
            *more: Any,
            **kwargs: Any,
        ) -> None:
            args = sft_arguments.resolve_sft_args(model, args)
            sft_arguments.refuse_packed_rows(args)  # checked at parse time too; args may have changed since
            model = _apply_patch_flags(model, args)
            if sft_arguments.per_sample_flags(args):
                train_dataset = trl_integration.with_example_ids(train_dataset)
            super().__init__(model, args, data_collator, train_dataset, *more, **kwargs)
            if self._per_sample_on:
                trl_integration.check_example_ids_kept(self.train_dataset)
                self.data_collator = trl_integration.ExampleIdCollator(self.data_collator)
            self._check_loss_convention()
            self._refuse_bypassed_lm_head()

        def _check_loss_convention(self) -> None:
            # SFTTrainer divides the token sum by num_items_in_batch whenever it gets one; HF's Trainer (and
            # so hf_gradext's mirror of the scale) assumes that only when the model takes loss kwargs.
            if not (self._gqc_on or self._per_sample_on):
                return
            if not trainer_internals.model_accepts_loss_kwargs(self):
                raise UserFacingError(
                    f"GradExtSFTTrainer: transformers does not pass loss kwargs to {type(self.model).__name__}"
                    ".forward, so SFTTrainer's loss scale differs from HF's and GQC / per-sample gradients "
                    "would be mis-scaled; use a model whose forward takes **kwargs"
                )

        def _refuse_bypassed_lm_head(self) -> None:
            engines = self._training_capture_engines()
            if not engines or not trl_integration.lm_head_bypassed(self.model):
                return
            for flag, engine in engines.items():
                names = trl_integration.bypassed_modules(self.model, engine.modules)
                if names:
                    for other in engines.values():
                        other.remove()  # the trainer is not built: leave no hooks on the user's model
                    raise UserFacingError(
                        f"{flag} selects {', '.join(names)}, but SFTTrainer's fused LM head never calls the "
                        "lm_head module, so their per-sample gradients would miss its part; exclude them "
                        f"({EXCLUDE_LM_HEAD[flag]})"
                    )

        def _training_capture_engines(self) -> dict[str, Any]:
            """``{flag that selects its layers: engine}`` of the consumers hooked into the training backward."""
            if not self._per_sample_on:
                return {}
            from hf_gradext.callbacks.collection import PerSampleGradientCallback
            from hf_gradext.callbacks.projection import GradientProjectionCallback

            engines: dict[str, Any] = {}
            for callback in self.callback_handler.callbacks:
                # Separate-mode collection runs its own plain forward, which does call lm_head.
                if isinstance(callback, PerSampleGradientCallback) and callback.mode == "training":
                    engines["--gradient_collection_layers"] = callback.engine
                elif isinstance(callback, GradientProjectionCallback):
                    engines["--proj_layers"] = callback.engine
            return engines

    GradExtSFTTrainer.__module__ = __name__
    return GradExtSFTTrainer


# How to leave the LM head out of each selection (for the fused-LM-head refusal).
EXCLUDE_LM_HEAD: dict[str, str] = {
    "--gradient_collection_layers": "e.g. --gradient_collection_layers attn,mlp,norm, or "
    "--gradient_collection_mode separate",
    "--proj_layers": "e.g. --proj_layers mlp,attn without --include_embeddings",
}


def _apply_patch_flags(model: Any, args: Any) -> Any:
    """Apply the GPT-2 patches ``args`` asks for explicitly to a loaded model (as ``hf-gradext train`` does).

    Without an explicit patch flag the user's model is left as it is.
    """
    from hf_gradext.arguments.sft import explicit_patch_flags

    flags = explicit_patch_flags(args)
    if not flags:
        return model
    if isinstance(model, str):
        raise UserFacingError(
            f"{', '.join(flags)} patch a loaded model, but GradExtSFTTrainer got the model id {model!r}; load it "
            "first (AutoModelForCausalLM.from_pretrained) and pass the model"
        )
    from hf_gradext.patches import apply_from_args

    return apply_from_args(args, model)
