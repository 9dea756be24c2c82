"""``hf-gradext train`` / ``python -m hf_gradext.train`` / ``accelerate launch -m hf_gradext.train``.

The ``run_clm.py`` flow with ``GradExtTrainer``: parse flags -> tokenizer -> config -> blocks ->
model (+ patches, LoRA) -> train -> save model, tokenizer, metrics and trainer state -> evaluate
(loss, perplexity, token accuracy). With no model and no data flags it trains the embedded default.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from typing import Any

from hf_gradext.checkpoints import (
    TRAINER_STATE_FILE,
    is_complete_checkpoint,
    newest_complete_checkpoint,
    verify_checkpoint,
)
from hf_gradext.errors import UserFacingError

logger = logging.getLogger("hf_gradext.train")
_RESUME_LATEST = ("true", "latest", "last")


def resolve_checkpoint(resume: str | None, output_dir: str, gqc: bool = False) -> str | None:
    """``--resume_from_checkpoint``: a path, or ``True``/``latest`` for the newest complete ``checkpoint-*``,
    verified (:func:`hf_gradext.checkpoints.verify_checkpoint`; ``gqc``: it must hold a GQC state).

    Raises:
        UserFacingError: the path does not exist or was not fully saved, ``latest`` finds no checkpoint, or a
            file of the checkpoint is damaged (named, with the fix).
    """
    if resume is None or str(resume).lower() in ("false", "none", ""):
        return None
    if str(resume).lower() in _RESUME_LATEST:
        last = newest_complete_checkpoint(output_dir)
        if last is None:
            raise UserFacingError(
                f"--resume_from_checkpoint {resume}: no complete checkpoint-* directory in --output_dir "
                f"{output_dir!r}; pass a checkpoint path or train without resuming first"
            )
        verify_checkpoint(last, gqc=gqc)
        return last
    if not os.path.isdir(resume):
        raise UserFacingError(
            f"--resume_from_checkpoint {resume!r} is not a directory; pass a checkpoint-* directory or 'latest'"
        )
    if not is_complete_checkpoint(resume):
        raise UserFacingError(
            f"--resume_from_checkpoint {resume!r} was not fully saved (no readable {TRAINER_STATE_FILE}: the "
            "run was stopped while saving); pass an earlier checkpoint or 'latest'"
        )
    verify_checkpoint(resume, gqc=gqc)
    return resume


def _check_output_dir(output_dir: str) -> None:
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserFacingError(
            f"--output_dir {output_dir!r} is a file, not a directory; pass a directory path"
        )


def check_output_dirs(args: Any, checkpoint: str | None) -> None:
    """Every directory the run will write, probed now (a read-only or full disk fails here, before the
    model or the data are loaded), and the row directories held to the output-directory policy's cheap part
    (a fresh run into another run's rows refuses now, not after tokenization).

    Raises:
        UserFacingError: naming the directory's flag and the fix.
    """
    from hf_gradext.store.disk import probe_writable
    from hf_gradext.store.policy import refuse_fresh_into_rows

    _check_output_dir(args.output_dir)
    probe_writable(args.output_dir, "--output_dir")  # creates nothing: a refused run leaves no directory
    mode = (
        "overwrite" if getattr(args, "overwrite_output_dir", False) else "resume" if checkpoint else "fresh"
    )
    for out in _row_dirs(args):
        probe_writable(out.path, out.flag)
        refuse_fresh_into_rows(out, mode)


def _row_dirs(args: Any) -> list[Any]:
    """The row directories this run's callbacks will write (under the output-directory policy)."""
    found = []
    if (
        getattr(args, "collect_gradients", False)
        and getattr(args, "gradient_collection_save", "stats") != "stats"
    ):
        from hf_gradext.arguments.collection import resolve_collection_dir
        from hf_gradext.collection.sink import collection_output

        found.append(collection_output(resolve_collection_dir(args)))
    if getattr(args, "project_gradients", False):
        from hf_gradext.callbacks.projection import PROJ_DIR_FLAG, projection_dir
        from hf_gradext.projection.io import projection_output
        from hf_gradext.store.policy import OVERWRITE_OUTPUT_DIR, RESUME_FROM_CHECKPOINT

        found.append(
            projection_output(
                projection_dir(args), PROJ_DIR_FLAG, OVERWRITE_OUTPUT_DIR, RESUME_FROM_CHECKPOINT
            )
        )
    return found


def check_data_flags(args: Any, has_eval: bool) -> None:
    """Flags that need an evaluation set, checked on the raw splits (before the long tokenization)."""
    if args.early_stopping_patience is not None and not has_eval:
        raise UserFacingError(
            "--early_stopping_patience needs an evaluation set; set --validation_split_percentage > 0 "
            "or pass --validation_file"
        )
    strategy = str(getattr(args.eval_strategy, "value", args.eval_strategy))
    if not has_eval and strategy != "no":
        raise UserFacingError(
            f"--eval_strategy {strategy} needs an evaluation set; set --validation_split_percentage > 0, "
            f"pass --validation_file, or use --eval_strategy no"
        )


def _setup_logging(args: Any) -> None:
    import datasets
    import huggingface_hub
    import transformers

    # datasets and huggingface_hub give their root logger its own stderr handler AND let records
    # propagate: with the root handler below every warning (each Hub retry) printed twice. Keep their
    # handler, stop the propagation (as transformers does by default, except when CI=1 is set).
    for library in (datasets, huggingface_hub, transformers):
        library.utils.logging.disable_propagation()
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    level = args.get_process_log_level()
    if args.log_level == "passive" and args.should_log:
        # run_clm.py's habit: INFO on the main process so the run shows what it is doing.
        level = logging.INFO
    logger.setLevel(level)
    logging.getLogger("hf_gradext").setLevel(level)
    datasets.utils.logging.set_verbosity(min(level, logging.WARNING))
    transformers.utils.logging.set_verbosity(level)
    if level > logging.INFO:
        datasets.utils.logging.disable_progress_bar()


def check_model_flags(args: Any, model: Any) -> None:
    """The flag checks that need the model (layer selections of collection and projection).

    Builds what the callbacks will build, then drops it, so a selection that matches nothing fails
    before the datasets are tokenized.

    Raises:
        UserFacingError: naming the flag, with what the model offers.
    """
    if getattr(args, "collect_gradients", False):
        from hf_gradext.callbacks.collection import build_collection_engine

        build_collection_engine(args, model).remove()
    if getattr(args, "project_gradients", False):
        from hf_gradext.projection.projector import projector_from_args

        projector_from_args(model, args).close()
    probe = getattr(args, "gradient_collection_probe_file", None)
    if getattr(args, "collect_gradients", False) and probe:
        from hf_gradext.collection.separate import read_probe_texts

        read_probe_texts(probe)  # a malformed probe file fails now, not when the trainer is built


def run(args: Any) -> dict[str, float]:
    """Train (and evaluate) with already parsed ``GradExtArguments``; returns the combined metrics."""
    from transformers import EarlyStoppingCallback, default_data_collator, set_seed

    from hf_gradext.data import build_datasets, load_raw_datasets, load_tokenizer
    from hf_gradext.hub import check_sources
    from hf_gradext.integrations.loss import shifts_labels
    from hf_gradext.metrics import (
        build_compute_metrics,
        load_metric,
        perplexity,
        preprocess_logits_for_metrics,
    )
    from hf_gradext.models import build_config, load_model, resolve_block_size
    from hf_gradext.store import disk_errors
    from hf_gradext.trainer import GradExtTrainer

    _check_output_dir(args.output_dir)
    gqc = getattr(args, "gqc", "none") not in (None, "none")
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir, gqc=gqc)
    check_output_dirs(args, checkpoint)
    _setup_logging(args)
    check_sources(args)  # missing local folders, a Hub dataset with the Hub unreachable: before any loading
    set_seed(args.seed)

    # Rank 0 builds caches (tokenizer, datasets, metric module) first; the others then read them.
    with args.main_process_first(desc="tokenizer"):
        tokenizer = load_tokenizer(args)
        config = build_config(args, tokenizer)
        block_size = resolve_block_size(args, tokenizer, config)
    # The model before the data: flags that need it fail before a long tokenization, not after.
    model = load_model(args, tokenizer, config)
    check_model_flags(args, model)
    with args.main_process_first(desc="datasets"):
        raw = load_raw_datasets(args)
        check_data_flags(args, has_eval=raw["validation"] is not None)
        train_ds, eval_ds = build_datasets(args, tokenizer, block_size=block_size, raw=raw)
        metric = load_metric("token_accuracy") if eval_ds is not None else None
    logger.info(
        "blocks of %d tokens: %d train, %s eval", block_size, len(train_ds), len(eval_ds) if eval_ds else 0
    )

    callbacks = []
    if args.early_stopping_patience is not None:
        check_data_flags(args, has_eval=eval_ds is not None)
        callbacks.append(EarlyStoppingCallback(args.early_stopping_patience, args.early_stopping_threshold))

    trainer = GradExtTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=build_compute_metrics(metric, shift=shifts_labels(model))
        if metric is not None
        else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if metric is not None else None,
        callbacks=callbacks,
    )

    result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = dict(result.metrics)
    metrics["train_samples"] = len(train_ds)
    trainer.log_metrics("train", metrics)
    with disk_errors(args.output_dir, "--output_dir", "saving the final model to"):
        trainer.save_model()  # model + tokenizer (processing_class)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
    all_metrics = {f"train_{k}" if not k.startswith("train") else k: v for k, v in metrics.items()}

    if eval_ds is not None:
        eval_metrics = trainer.evaluate()
        eval_metrics["eval_samples"] = len(eval_ds)
        eval_metrics["perplexity"] = perplexity(eval_metrics["eval_loss"])
        trainer.log_metrics("eval", eval_metrics)
        with disk_errors(args.output_dir, "--output_dir", "saving the evaluation metrics to"):
            trainer.save_metrics("eval", eval_metrics)
        all_metrics.update(eval_metrics)
    if not all(math.isfinite(v) for v in all_metrics.values() if isinstance(v, float)):
        logger.warning("some metrics are not finite: %s", all_metrics)
    return all_metrics


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (2 and one ``error:`` line on bad input)."""
    from hf_gradext.arguments.parsing import parse_args
    from hf_gradext.process_group import end_process_group

    try:
        args = parse_args(argv)
        run(args)
        end_process_group()
    except UserFacingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
