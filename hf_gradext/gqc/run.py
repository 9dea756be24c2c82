"""State of one GQC training run inside ``GradExtTrainer``: horizon, data position, checkpoint file, logs.

``GradExtTrainer`` calls these from its GQC section (``set_initial_training_values``,
``_init_training_state``, ``create_scheduler``, ``_save_checkpoint``, ``log``); the epoch loop itself
is :func:`hf_gradext.gqc.loop.run_gqc_epoch`.

Bounds: a GQC run is bounded by data. The horizon (in microbatches per rank) is
``--gqc_microbatch_budget`` if set, else ``ceil(num_train_epochs * len(train_dataloader))``; the LR
scheduler and the threshold schedule both use it, and advance by the microbatches consumed at each
step. ``--gqc_token_budget`` also stops the run (schedules then follow max(microbatch, token)
progress). ``--max_steps`` only stops the run early: it does not shorten the schedules.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from hf_gradext.errors import UserFacingError
from hf_gradext.gqc.controllers import build_controller
from hf_gradext.gqc.core import GQCCore
from hf_gradext.gqc.lr_coupling import PowerCoupling, build_coupling
from hf_gradext.gqc.schedules import schedule_from_args

GQC_STATE_NAME = "gqc_state.json"
STATE_VERSION = 1


@dataclass
class GQCRun:
    """Controller + data position of a run (what a checkpoint must restore)."""

    core: GQCCore
    horizon: int  # microbatches per rank the schedules span
    microbatches_per_epoch: int | None
    token_budget: int = 0
    epoch: int = 0
    microbatches_in_epoch: int = 0
    pending: list[dict[str, float]] = field(default_factory=list)  # per-step records not yet logged
    coupling: PowerCoupling | None = None  # --gqc_lr_coupling (its k0 is latched, so it is checkpointed)
    # Set by restore_position (GradExtTrainer._init_training_state); the epoch loop refuses to run without
    # it: it proves transformers called the override that sets the run's data position.
    position_restored: bool = False

    def position(self) -> float:
        """Data consumed, in microbatches (token progress mapped onto the same axis)."""
        pos = float(self.core.totals["microbatches"])
        if self.token_budget:
            pos = max(pos, self.core.totals["tokens"] / self.token_budget * self.horizon)
        return pos

    def budget_reached(self) -> bool:
        t = self.core.totals
        return t["microbatches"] >= self.horizon or bool(
            self.token_budget and t["tokens"] >= self.token_budget
        )

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "microbatches_in_epoch": self.microbatches_in_epoch,
            "horizon": self.horizon,
            "core": self.core.state_dict(),
            "lr_coupling": self.coupling.state_dict() if self.coupling is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise UserFacingError(
                f"{GQC_STATE_NAME} has version {state.get('version')}; expected {STATE_VERSION}"
            )
        self.epoch = int(state["epoch"])
        self.microbatches_in_epoch = int(state["microbatches_in_epoch"])
        self.core.load_state_dict(state["core"])
        if self.coupling is not None and state.get("lr_coupling"):
            self.coupling.load_state_dict(state["lr_coupling"])

    # ------------------------------------------------------------------ logs
    def drain_step_logs(self) -> dict[str, float]:
        """Per-step keys for a training log entry (averaged if several steps share one entry)."""
        t = self.core.totals
        out: dict[str, float] = {
            "gqc/tokens": t["tokens"],
            "gqc/microbatches_total": t["microbatches"],
            "gqc/skipped_windows": t["skipped_windows"],
            "gqc/skipped_microbatches": t["skipped_microbatches"],
            "gqc/capped_steps": t["capped_steps"],
        }
        if self.pending:
            out["gqc/microbatches"] = sum(p["k"] for p in self.pending) / len(self.pending)
            out["gqc/grad_norm"] = self.pending[-1]["grad_norm"]
            out["gqc/threshold"] = self.pending[-1]["threshold"]
            out["gqc/window_tokens"] = sum(p["tokens"] for p in self.pending) / len(self.pending)
            last = self.pending[-1]
            if self.coupling is not None or self.core.controller.name == "seesaw":
                out["gqc/lr_multiplier"] = last.get("lr_multiplier", 1.0)
            if "b_simple" in last:
                out["gqc/b_simple"] = last["b_simple"]
            self.pending = []
        return out

    def summary(self) -> dict[str, float]:
        t = self.core.totals
        out = {f"gqc/total_{k}": v for k, v in t.items()}
        out["gqc/mean_microbatches_per_step"] = (
            (t["microbatches"] - t["skipped_microbatches"]) / t["steps"] if t["steps"] else 0.0
        )
        return out


def build_run(args, microbatches_per_epoch: int | None) -> GQCRun:
    """Horizon + controller + schedule of a run from the arguments and the dataloader length."""
    if args.gqc_microbatch_budget:
        horizon = args.gqc_microbatch_budget
    elif microbatches_per_epoch:
        horizon = math.ceil(args.num_train_epochs * microbatches_per_epoch)
    else:
        raise UserFacingError(
            "--gqc needs a data bound: the train dataset has no length, so set --gqc_microbatch_budget"
        )
    core = GQCCore(
        build_controller(args),
        schedule=schedule_from_args(args, horizon),
        max_microbatches=args.gqc_max_microbatches,
    )
    return GQCRun(
        core=core,
        horizon=horizon,
        microbatches_per_epoch=microbatches_per_epoch,
        token_budget=args.gqc_token_budget,
        coupling=build_coupling(
            getattr(args, "gqc_lr_coupling", "none"), getattr(args, "gqc_lr_coupling_k0", 0)
        ),
    )


def initial_training_values(trainer, args, dataloader) -> tuple[int, int, int, int, int, int, int]:
    """GQC replacement of ``Trainer.set_initial_training_values``: sizes measured in microbatches."""
    from transformers.trainer_utils import has_length

    len_dl = (len(dataloader) or None) if has_length(dataloader) else None
    run = build_run(args, len_dl)
    trainer._gqc_run = run
    total_batch = trainer.get_total_train_batch_size(args)
    if len_dl:
        num_epochs = math.ceil(run.horizon / len_dl)
        num_examples = trainer.num_examples(dataloader)
    else:
        num_epochs = sys.maxsize
        num_examples = total_batch * run.horizon
    steps_in_epoch = len_dl or run.horizon
    # state.max_steps: an upper bound (every step takes >= 1 microbatch), or the user's --max_steps.
    max_steps = args.max_steps if args.max_steps > 0 else run.horizon
    return (
        num_epochs,
        steps_in_epoch,
        num_examples,
        run.horizon * total_batch,
        total_batch,
        steps_in_epoch,
        max_steps,
    )


def require_run(trainer) -> GQCRun:
    """This ``train()`` call's GQCRun; a drift error when transformers skipped the sizing override.

    ``GradExtTrainer.train`` clears the run and only ``set_initial_training_values`` builds it, so a
    missing run means transformers no longer calls that hook (the run would otherwise use HF's sizes).
    """
    run: GQCRun | None = trainer._gqc_run
    if run is None:
        from hf_gradext.integrations.guard import drift_error

        raise drift_error(
            "Trainer.set_initial_training_values",
            "transformers",
            "the GQC run has no sizes (transformers did not call GradExtTrainer.set_initial_training_values)",
        )
    return run


def restore_position(trainer, resume_from_checkpoint: str | None) -> tuple[int, int]:
    """Load ``gqc_state.json`` (when resuming) and return ``(epochs_trained, microbatches_in_epoch)``."""
    run = require_run(trainer)
    if resume_from_checkpoint is None:
        run.position_restored = True
        return 0, 0
    path = os.path.join(resume_from_checkpoint, GQC_STATE_NAME)
    if not os.path.isfile(path):
        raise UserFacingError(
            f"{resume_from_checkpoint} has no {GQC_STATE_NAME} (not written by a GQC run, or written "
            "partially); resume from a checkpoint of a --gqc run or drop --resume_from_checkpoint"
        )
    from hf_gradext.store.integrity import read_json

    state = read_json(
        path, "resume from an earlier checkpoint-* of the run, or drop --resume_from_checkpoint"
    )
    if not isinstance(state, dict):
        raise UserFacingError(
            f"{path} holds no GQC state (a JSON object was expected); resume from an earlier checkpoint-*"
        )
    run.load_state_dict(state)
    run.position_restored = True
    return run.epoch, run.microbatches_in_epoch


def save_state(trainer, trial) -> None:
    """Write ``gqc_state.json`` into the checkpoint folder that ``_save_checkpoint`` is about to fill.

    Written first (a per-process temp name, fsync, ``os.replace``: a full disk is one line naming the
    folder): HF writes ``trainer_state.json`` last, so a checkpoint that looks complete always carries its
    GQC state.
    """
    run: GQCRun | None = getattr(trainer, "_gqc_run", None)
    if run is None or not trainer.args.should_save:
        return
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from hf_gradext.integrations.trainer import output_dir

    out_dir = os.path.join(output_dir(trainer, trial), f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}")
    os.makedirs(out_dir, exist_ok=True)
    from hf_gradext.store.shards import write_json_atomic

    write_json_atomic(os.path.join(out_dir, GQC_STATE_NAME), run.state_dict(), flag="--output_dir")


def decorate_logs(trainer, logs: dict[str, float]) -> None:
    """Add GQC keys to a training log entry, and run totals to the end-of-training summary."""
    run: GQCRun | None = getattr(trainer, "_gqc_run", None)
    if run is None:
        return
    if "train_runtime" in logs:
        logs.update(run.summary())
    elif "loss" in logs and not any(k.startswith("eval_") for k in logs):
        logs.update(run.drain_step_logs())


def check_supported(trainer) -> None:
    """Refuse at trainer construction what the GQC loop cannot run correctly (one-line errors).

    Parse time (:meth:`hf_gradext.arguments.gqc.GQCArguments._validate_gqc`) already refuses what the
    flags and the launcher's environment show; the accelerator built by the Trainer is the final word
    (e.g. a programmatic ``Accelerator`` / plugin, or a launcher config the flags did not show). Also
    checks, before any training work, the transformers hooks the GQC mode overrides.
    """
    from accelerate.utils import DistributedType

    from hf_gradext.arguments.gqc import DEEPSPEED_REFUSAL, FSDP_REFUSAL, METRIC_SCHEDULERS
    from hf_gradext.integrations.trainer import check_trainer_hooks

    args = trainer.args
    kind = trainer.accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise UserFacingError(DEEPSPEED_REFUSAL.format(gqc=args.gqc))
    if kind == DistributedType.FSDP:
        raise UserFacingError(FSDP_REFUSAL.format(gqc=args.gqc))
    check_trainer_hooks(metric_scheduler=args.lr_scheduler_type in METRIC_SCHEDULERS)
