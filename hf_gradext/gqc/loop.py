"""The GQC epoch loop: HF's ``_run_epoch`` with the window decided per microbatch.

Kept from HF: ``training_step`` (so microbatch observers, autocast, gradient checkpointing and peft
work unchanged), callbacks, ``_maybe_log_save_evaluate`` (logging, evaluation, checkpoints), the
resume data skip and RNG reload.

Changed, per microbatch:

* the loss is a token *sum* (``num_items_in_batch=1`` makes HF's loss divide by 1); the window's
  gradient is divided once, at decision time, by the window's label-token count summed over ranks,
  so the tested gradient and the stepped gradient are the exact token mean of the window;
* under DDP every microbatch's backward all-reduces (no ``no_sync``): the decision needs the global
  gradient. One extra all-reduce of a few scalars per microbatch makes every rank see the same
  numbers, hence take the same decision; another, before the forward, makes all ranks stop together
  when one runs out of data;
* clipping applies once to the final mean gradient; a non-finite gradient or loss drops the window;
* the LR scheduler is advanced to the data position (microbatches consumed), not once per step;
  metric-driven schedulers (``reduce_lr_on_plateau``, ``greedy``) are stepped by HF's evaluation with
  the eval metric, exactly as in HF's own loop (this loop reaches it through ``_maybe_log_save_evaluate``).

Every private Trainer / accelerate internal goes through :mod:`hf_gradext.integrations` (checked once).
Because the loop is reached only through overridden private hooks, it also verifies at run time that
transformers really called them: the run's sizes and data position must come from this run's
``set_initial_training_values`` / ``_init_training_state`` overrides, and ``GradExtTrainer.training_step``
refuses a ``--gqc`` microbatch that runs outside this loop (:func:`check_in_gqc_loop`).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch

from hf_gradext.errors import UserFacingError
from hf_gradext.gqc import lr_coupling
from hf_gradext.gqc.noise import SampleNormStats, weight_vector
from hf_gradext.gqc.norms import MicrobatchNormTracker, grads_of, scale_, total_norm
from hf_gradext.gqc.run import GQCRun, require_run
from hf_gradext.gqc.sample_norms import VECTOR_SIZE, SampleNormCapture, sample_weights
from hf_gradext.grad.observer import trainer_shifts_labels
from hf_gradext.integrations import accelerate as accelerate_internals
from hf_gradext.integrations import loss as loss_integration
from hf_gradext.integrations import trainer as trainer_internals
from hf_gradext.integrations.guard import drift_error

# Set on the trainer while run_gqc_epoch runs; GradExtTrainer.training_step checks it.
IN_LOOP_ATTR = "_gqc_in_loop"


def _world(trainer) -> int:
    return max(1, int(trainer.accelerator.num_processes))


def _all_reduce_sum(values: torch.Tensor, trainer) -> torch.Tensor:
    if _world(trainer) > 1:
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
    return values


def _counts(trainer, inputs: dict[str, Any]) -> tuple[torch.Tensor | float, torch.Tensor | float, float]:
    """(label tokens the loss averages over, input tokens, samples) of one microbatch, local.

    Token counts stay device tensors: they travel to the host with the post-backward reduction, so
    counting costs no GPU wait before the forward.
    """
    ids = inputs.get("input_ids")
    samples = float(ids.shape[0]) if ids is not None else 0.0
    mask = inputs.get("attention_mask")
    tokens = mask.sum() if mask is not None else float(ids.numel()) if ids is not None else 0.0
    if "shift_labels" in inputs:
        labels = inputs["shift_labels"]
    elif "labels" in inputs:
        labels = inputs["labels"][..., 1:] if trainer_shifts_labels(trainer) else inputs["labels"]
    else:
        return samples, tokens, samples  # no labels: one item per sample
    return labels.ne(-100).sum(), tokens, samples


def _loss_is_sum(trainer) -> bool:
    """True when HF forwards ``num_items_in_batch`` into the loss (then 1 gives a token-sum loss)."""
    return trainer_internals.model_accepts_loss_kwargs(trainer) or trainer.compute_loss_func is not None


def _controller_record(controller) -> dict[str, float]:
    """Per-step numbers a controller adds to the step log (gns_sample: the estimate it stepped on)."""
    est = getattr(controller, "last", None) if controller.needs_sample_norms else None
    return {"b_simple": est.b_simple} if est is not None else {}


def is_metric_scheduler(sched: Any) -> bool:
    """ReduceLROnPlateau / transformers' GreedyLR: stepped with an eval metric, by HF's evaluation."""
    from transformers.optimization import GreedyLR

    return isinstance(sched, (torch.optim.lr_scheduler.ReduceLROnPlateau, GreedyLR))


def _advance_lr(trainer, position: float) -> None:
    """Step the LR scheduler until its counter reaches the data position (in microbatches)."""
    sched = trainer.lr_scheduler
    if sched is None or is_metric_scheduler(sched):
        return
    if not isinstance(sched, torch.optim.lr_scheduler.LRScheduler):
        raise UserFacingError(
            f"--gqc advances the LR scheduler to the data position through its last_epoch counter; "
            f"{type(sched).__name__} is no torch LRScheduler: pass one (or a metric-driven scheduler)"
        )
    target = int(position)
    while sched.last_epoch < target:
        sched.step()


def check_in_gqc_loop(trainer) -> None:
    """Raise unless the GQC loop is running: called by every ``--gqc`` training microbatch.

    transformers reaches the GQC loop only by calling the overridden ``Trainer._run_epoch``; if it
    stopped doing so, HF's own loop would train at accumulation 1 while GQC keys still got logged.
    The static check at construction (:func:`hf_gradext.integrations.trainer.check_trainer_hooks`)
    reads HF's code; this one observes the run itself, before the first backward.
    """
    if not getattr(trainer, IN_LOOP_ATTR, False):
        raise drift_error(
            "Trainer._run_epoch",
            "transformers",
            "a --gqc training step ran outside the GQC loop (GQC loop was not called: transformers' "
            "training loop no longer goes through GradExtTrainer._run_epoch, so GQC would silently train "
            "at a fixed accumulation of 1)",
        )


def _verified_run(trainer) -> GQCRun:
    """This ``train()`` call's GQCRun, checking that transformers called the sizing / restore hooks."""
    run = require_run(trainer)
    if not run.position_restored:
        raise drift_error(
            "Trainer._init_training_state",
            "transformers",
            "the GQC epoch loop started without its data position (transformers did not call "
            "GradExtTrainer._init_training_state)",
        )
    return run


def run_gqc_epoch(
    trainer,
    model,
    epoch,
    train_dataloader,
    steps_in_epoch,
    num_update_steps_per_epoch,
    trial,
    ignore_keys_for_eval,
    start_time,
    resume_from_checkpoint,
    epochs_trained,
    steps_trained_in_current_epoch,
) -> None:
    """One pass over ``train_dataloader`` with GQC windows (signature of HF's ``_run_epoch``)."""
    run = _verified_run(trainer)
    setattr(trainer, IN_LOOP_ATTR, True)
    try:
        _run_epoch(
            trainer,
            run,
            model,
            epoch,
            train_dataloader,
            steps_in_epoch,
            trial,
            ignore_keys_for_eval,
            start_time,
            resume_from_checkpoint,
            epochs_trained,
            steps_trained_in_current_epoch,
        )
    finally:
        setattr(trainer, IN_LOOP_ATTR, False)


def _run_epoch(
    trainer,
    run: GQCRun,
    model,
    epoch,
    train_dataloader,
    steps_in_epoch,
    trial,
    ignore_keys_for_eval,
    start_time,
    resume_from_checkpoint,
    epochs_trained,
    steps_trained_in_current_epoch,
) -> None:
    args = trainer.args
    core = run.core
    if run.budget_reached():  # resumed exactly at the end of the data budget
        trainer.control.should_training_stop = True
        return
    world = _world(trainer)
    device = args.device

    # ---- resume: skip the microbatches already consumed in this epoch (HF's own mechanism)
    rng_to_sync = False
    run.epoch, run.microbatches_in_epoch = epoch, 0
    if epoch == epochs_trained and resume_from_checkpoint is not None:
        if steps_trained_in_current_epoch > 0 and not args.ignore_data_skip:
            train_dataloader = accelerate_internals.skip_first_batches(
                train_dataloader, steps_trained_in_current_epoch
            )
            run.microbatches_in_epoch = steps_trained_in_current_epoch
            rng_to_sync = True
        elif steps_trained_in_current_epoch == 0:
            trainer_internals.load_rng_state(trainer, resume_from_checkpoint)
    if hasattr(train_dataloader, "set_epoch"):
        train_dataloader.set_epoch(epoch)
    inner = getattr(getattr(train_dataloader, "batch_sampler", None), "batch_sampler", None)
    if hasattr(inner, "set_epoch"):
        inner.set_epoch(epoch)
    iterator = iter(train_dataloader)

    def fetch():
        return next(iterator, None)

    def log_save_evaluate(grad_norm: float | None, learning_rate: float | None) -> None:
        # HF's log/save/evaluate hook, run after each optimizer step and once at the end of the epoch.
        trainer_internals.maybe_log_save_evaluate(
            trainer, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time, learning_rate
        )

    sum_loss = _loss_is_sum(trainer)
    one = torch.ones((), device=device) if sum_loss else None
    trainer_internals.set_current_accumulation_steps(trainer, 1)
    # What HF multiplies the token-sum loss by (num_items_in_batch=1): num_processes // tp_size under
    # average_tokens_across_devices; asked of the package's one mirror of HF's loss scaling.
    loss_mult = float(loss_integration.hf_loss_multiplier(trainer, 1)) if sum_loss else 1.0
    params = [p for p in model.parameters() if p.requires_grad]
    tracker = getattr(trainer, "_gqc_tracker", None)
    if core.controller.needs_microbatch_norms and tracker is None:
        tracker = trainer._gqc_tracker = MicrobatchNormTracker(params)
    needs_metrics = core.controller.needs_metrics
    capture = getattr(trainer, "_gqc_sample_capture", None)
    if core.controller.needs_sample_norms and capture is None:
        # Hooks on every module owning a trainable parameter: the per-sample norms then cover exactly the
        # parameters of the tested norm below (``params``). Built once per trainer, like the tracker.
        # --gqc_sample_norm_layers picks a subset; the window norm is then also taken over its parameters.
        capture = trainer._gqc_sample_capture = SampleNormCapture(
            trainer.model, getattr(args, "gqc_sample_norm_layers", "all")
        )
    subset = capture.params if capture is not None and not capture.covers_all else None

    grad_norm: float | None = None
    learning_rate: float | None = None
    window_loss = torch.zeros((), device=device, dtype=torch.float64)
    current = fetch()
    if rng_to_sync:
        trainer_internals.load_rng_state(trainer, resume_from_checkpoint)
    # Whether every rank has a first microbatch; later ones are agreed in each post-backward reduction.
    has_next = float(current is not None)
    if world > 1:
        has_next = _all_reduce_sum(
            torch.tensor([has_next], dtype=torch.float64, device=device), trainer
        ).item()
    stopped_by_budget, exhausted = False, has_next < world
    # Post-backward reduction layout: [non-finite flag, loss, ||grad||^2, label items, input tokens,
    # samples, ranks with a next microbatch, per-rank microbatch norm (world), per-rank metric (world),
    # per-sample statistics (4, gns_sample only: additive, so the sum over ranks is the global one),
    # ||grad||^2 over the per-sample norms' parameters (1, only when they are a subset)].
    norms_at, metrics_at, samples_at = 7, 7 + world, 7 + 2 * world
    subset_at = samples_at + (VECTOR_SIZE if capture is not None else 0)
    vec_size = subset_at + (1 if subset is not None else 0)
    window_factor: float | None = None  # LR scheduler factor at the current window's first microbatch
    while has_next >= world:
        upcoming = fetch()
        if core.window_k == 0:
            trainer.control = trainer.callback_handler.on_step_begin(args, trainer.state, trainer.control)
            # The scheduler sits at this window's start (advanced after the last step): seesaw sizes the
            # window from it, and the step's coupled LR is relative to it.
            window_factor = lr_coupling.lr_factor(trainer.optimizer)

        accelerate_internals.set_sync_gradients(trainer.accelerator, True)
        local_items, local_tokens, local_samples = _counts(trainer, current)
        # --gqc_sample_norm_every: the controller picks the measured microbatches from the run's global
        # microbatch count (checkpointed, equal on every rank), so ranks and resumed runs agree. Unmeasured
        # ones run with the hooks disarmed: no (a, g) records, no per-sample math.
        measured = capture is not None and core.controller.measures(int(core.totals["microbatches"]))
        armed = capture.microbatch(trainer, current, one) if measured else nullcontext()
        with armed:
            loss = trainer.training_step(model, current, one)  # token sum (x loss_mult) or microbatch mean
        trainer.current_flos += float(trainer.floating_point_ops(current))
        trainer_internals.track_num_input_tokens(trainer, current)

        # ---- the microbatch's one host read: its decision inputs, summed over ranks
        grads = grads_of(params)
        rank = int(args.process_index)
        loss_f = loss.detach().to(torch.float64)
        # Item assignment takes device tensors and Python numbers alike without a host round trip
        # (building a CUDA tensor from a Python number would copy from pageable memory: a stream sync).
        vec = torch.zeros(vec_size, dtype=torch.float64, device=device)
        vec[0] = (~torch.isfinite(loss_f)).to(torch.float64)
        vec[1] = loss_f / loss_mult if sum_loss else loss_f / world
        vec[2] = total_norm(grads).to(device=device, dtype=torch.float64) ** 2 / world
        vec[3] = local_items
        vec[4] = local_tokens
        vec[5] = local_samples
        vec[6] = float(upcoming is not None)
        items_f = vec[3].clone()  # this rank's label tokens, before the reduction sums the ranks
        if tracker is not None:
            mb = tracker.pop_tensor()
            vec[norms_at + rank] = mb / (loss_mult * items_f.clamp_min(1.0)) if sum_loss else mb
        if needs_metrics:
            vec[metrics_at + rank] = loss_f / (loss_mult * items_f.clamp_min(1.0)) if sum_loss else loss_f
        if capture is not None:
            weights = sample_weights(current, trainer_shifts_labels(trainer), sum_loss)  # (B,) or None
            # Unmeasured: exact count and weights (from the labels), sq_sum 0; the controller imputes it.
            vec[samples_at:subset_at] = (
                capture.vector(weights) if measured else weight_vector(weights, int(local_samples), device)
            )
        if subset is not None:
            vec[subset_at] = total_norm(grads_of(subset)).to(device=device, dtype=torch.float64) ** 2 / world
        vals = _all_reduce_sum(vec, trainer).tolist()
        core.add_microbatch(items=vals[3], tokens=vals[4], samples=int(vals[5]))
        run.microbatches_in_epoch += 1
        has_next = vals[6]
        last = has_next < world or run.budget_reached()
        nonfinite = vals[0] > 0 or not math.isfinite(vals[2])
        window_loss += vals[1]
        # .grad holds (loss_mult / world) * (sum over ranks of token-sum gradients): the mean is a rescale.
        factor = world / (loss_mult * max(core.window_items, 1.0)) if sum_loss else 1.0 / core.window_k
        mean_norm = math.sqrt(max(vals[2], 0.0)) * factor if not nonfinite else float("nan")
        decision = core.decide(
            mean_norm,
            position=max(run.position() - 1, 0.0),
            nonfinite=nonfinite,
            microbatch_norms=vals[norms_at:metrics_at] if tracker is not None else (),
            metrics=vals[metrics_at:samples_at] if needs_metrics else (),
            force=last,
            sample_stats=SampleNormStats.from_vector(vals[samples_at:subset_at])
            if capture is not None
            else None,
            sample_norms_measured=measured or capture is None,
            lr_factor=window_factor,
            sample_mean_grad_norm=math.sqrt(max(vals[subset_at], 0.0)) * factor
            if subset is not None
            else None,
        )
        trainer.state.epoch = epoch + run.microbatches_in_epoch / steps_in_epoch

        if decision.step:
            scale_(grads, factor)
            clipped = (
                trainer_internals.clip_grad_norm(trainer, model)
                if args.max_grad_norm and args.max_grad_norm > 0
                else None
            )
            grad_norm = float(clipped) if clipped is not None else mean_norm
            mult = lr_coupling.step_multiplier(core.controller, run.coupling, decision.k, window_factor)
            with lr_coupling.scaled_lr(trainer.optimizer, mult):  # this step only (--gqc_lr_coupling, seesaw)
                trainer.control = trainer.callback_handler.on_pre_optimizer_step(
                    args, trainer.state, trainer.control
                )
                trainer.optimizer.step()
                trainer.control = trainer.callback_handler.on_optimizer_step(
                    args, trainer.state, trainer.control
                )
            learning_rate = trainer_internals.get_learning_rate(trainer) * mult
            _advance_lr(trainer, run.position())
            model.zero_grad()
            denom = decision.items if sum_loss else decision.k
            trainer_internals.accumulate_train_loss(trainer, window_loss / max(denom, 1.0))
            window_loss.zero_()
            trainer.state.global_step += 1
            run.pending.append(
                {
                    "k": decision.k,
                    "grad_norm": decision.mean_grad_norm,
                    "threshold": decision.threshold,
                    "tokens": decision.items,
                    "lr_multiplier": mult,
                    **_controller_record(core.controller),
                }
            )
            trainer.control = trainer.callback_handler.on_step_end(args, trainer.state, trainer.control)
            log_save_evaluate(grad_norm, learning_rate)
        elif decision.skip:
            # Never let NaN/inf reach the optimizer; the data still counts for the schedules.
            model.zero_grad()
            window_loss.zero_()
            _advance_lr(trainer, run.position())
        else:
            trainer.control = trainer.callback_handler.on_substep_end(args, trainer.state, trainer.control)

        current = upcoming
        at_boundary = core.window_k == 0
        if last:
            exhausted = has_next < world
            stopped_by_budget = not exhausted and run.budget_reached()
            break
        if at_boundary and (trainer.control.should_epoch_stop or trainer.control.should_training_stop):
            break

    # An epoch with no data (a one-pass stream, already consumed) would repeat forever: iterable
    # datasets get sys.maxsize epochs. HF's own loop stops in this case too. (A resume that skipped
    # the whole epoch has microbatches_in_epoch > 0 and goes on to the next epoch.)
    if stopped_by_budget or run.budget_reached() or (exhausted and run.microbatches_in_epoch == 0):
        trainer.control.should_training_stop = True
    if exhausted:
        # Epoch fully consumed: a checkpoint taken now resumes at the start of the next epoch.
        run.epoch, run.microbatches_in_epoch = epoch + 1, 0

    trainer.control = trainer.callback_handler.on_epoch_end(args, trainer.state, trainer.control)
    log_save_evaluate(grad_norm, learning_rate)
