"""``hf-gradext project``: one pass over a dataset, projected per-sample gradients, no optimizer.

Distribution: under ``accelerate launch`` every rank loads the same model (same seed for a from-scratch
model) and takes every ``world_size``-th of the examples still to do; each writes its own shards
(``proj-rankNNN-*``), and :func:`hf_gradext.projection.load_projections` merges them into one index
ordered by example id. Resume (``--resume``): example ids already in complete shards (of any rank) are
skipped, so a killed run, restarted with the same command plus ``--resume``, neither duplicates nor misses
an example, even with a different number of processes.

Data (:mod:`hf_gradext.data.streaming`): with ``--streaming`` the split is read through ``datasets``
streaming and tokenized 1000 documents at a time while the pass runs, so memory does not grow with the
dataset; with ``--max_samples`` (either mode) only the documents the first N blocks need are tokenized.
Both give exactly the blocks and example ids of the full tokenization; every rank walks the same blocks
and takes every ``world_size``-th of those still to do, as without streaming.

Output directory (the policy of :mod:`hf_gradext.store.policy`): a directory holding rows is refused
unless ``--resume`` (then the model's weights fingerprint and every row setting -- projection metadata,
storage dtype, data and split -- must be those of the run that wrote it) or ``--overwrite`` (its rows and
metadata are removed, logged). A fresh run is refused before the model is loaded.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hf_gradext.arguments.ranges import SEED_MAX
from hf_gradext.devices import HostCopy, check_device
from hf_gradext.errors import UserFacingError
from hf_gradext.projection.io import (
    DTYPES,
    METADATA_FILE,
    RUN_CONFIG_FILE,
    STATS_FILE,
    ProjectionShardWriter,
    completed_example_ids,
    projection_output,
    row_settings,
    write_json_atomic,
)
from hf_gradext.projection.projector import KroneckerProjector, projector_from_args
from hf_gradext.store.integrity import read_json
from hf_gradext.store.policy import (
    RunFingerprint,
    choose_mode,
    model_fingerprint,
    prepare_output_dir,
    refuse_fresh_into_rows,
)

if TYPE_CHECKING:  # the data modules import datasets/transformers: not for `project --help`
    from hf_gradext.data.streaming import BlockStream, DocumentSource

logger = logging.getLogger(__name__)
# Test hook: hard-exit (as a kill would) after this many batches, to test resuming.
KILL_ENV = "HF_GRADEXT_TEST_KILL_AFTER_BATCHES"
WRITER = "project"  # the writer named in the directory's run fingerprint
FLAGS = ("--output_dir", "--overwrite", "--resume")  # the directory, overwrite and resume flags
# Model/data flags that decide which text an example id names (the model itself is fingerprinted).
DATA_SETTINGS = (
    "dataset_name",
    "dataset_config_name",
    "train_file",
    "validation_file",
    "text_column",
    "validation_split_percentage",
    "block_size",
    "keep_linebreaks",
    "tokenizer_name",
    "tokenizer_vocab_size",
)


@dataclass
class ProjectRunArguments:
    output_dir: str = field(default="projections", metadata={"help": "Where shards and metadata go."})
    batch_size: int = field(default=8, metadata={"help": "Examples per forward+backward (per process)."})
    max_samples: int | None = field(
        default=None,
        metadata={
            "help": "Project only the first N examples (blocks) of the split; only the documents they need "
            "are tokenized (the blocks and ids are those of the whole split's first N)."
        },
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Read the data with datasets streaming and tokenize it 1000 documents at a time during "
            "the pass: memory stays flat with dataset size, the example ids are those of a run without it. "
            "The progress bar has a total and ETA with --max_samples or a known number of documents, else "
            "it shows the count and rate. Refused with --preprocessing_num_workers, and with a "
            "--validation_split_percentage hold-out from a Hub dataset whose size is not in its metadata."
        },
    )
    split: str = field(
        default="train", metadata={"help": "Which split to project.", "choices": ["train", "validation"]}
    )
    device: str = field(
        default="auto",
        metadata={"help": "cuda, cpu, cuda:1, ... ('auto': the accelerate device of this process)."},
    )
    seed: int = field(
        default=42, metadata={"help": "Seed for building a from-scratch model (same on every rank)."}
    )
    snippet_chars: int = field(default=80, metadata={"help": "Characters of decoded text kept per example."})
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Remove the rows and metadata an earlier run left in --output_dir (logged) and start over."
        },
    )
    resume: bool = field(
        default=False,
        metadata={
            "help": "Continue the run that wrote --output_dir (e.g. after a kill): skip the examples already "
            "there. Refused unless the model weights and the row settings (projection, data) are that run's. "
            "Without --resume or --overwrite a directory holding rows is refused."
        },
    )
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar."})

    def _validate_run(self) -> None:
        if self.batch_size < 1:
            raise UserFacingError(f"--batch_size={self.batch_size} must be >= 1")
        if self.max_samples is not None and self.max_samples < 1:
            raise UserFacingError(f"--max_samples={self.max_samples} must be >= 1 (or unset for all)")
        if self.snippet_chars < 0:
            raise UserFacingError(f"--snippet_chars={self.snippet_chars} must be >= 0 (0 = no snippet)")
        if not 0 <= self.seed <= SEED_MAX:
            raise UserFacingError(f"--seed={self.seed} must be in [0, {SEED_MAX}]")
        check_device(self.device, allow_auto=True)
        self.mode()

    def mode(self) -> str:
        """``fresh``, ``overwrite`` or ``resume`` (the output-directory policy, hf_gradext/store/policy.py)."""
        return choose_mode(self.overwrite, self.resume, FLAGS[1], FLAGS[2])


def data_settings(margs: Any, split: str) -> dict[str, Any]:
    """The model/data flags that decide which block of text each example id is (part of the row settings)."""
    return {**{k: getattr(margs, k, None) for k in DATA_SETTINGS}, "split": split}


def load_model_for_pass(margs: Any, rargs: Any, block_size: int | None) -> tuple[Any, Any]:
    """Tokenizer and model (sets ``margs.block_size``); a from-scratch model is seeded with ``rargs.seed``."""
    from transformers import set_seed

    from hf_gradext.data import load_tokenizer
    from hf_gradext.hub import check_sources
    from hf_gradext.models import build_config, load_model, resolve_block_size

    check_sources(margs)  # a missing folder or an unreachable Hub dataset fails before the model loads
    tokenizer = load_tokenizer(margs)
    config = build_config(margs, tokenizer)
    margs.block_size = resolve_block_size(margs, tokenizer, config) if block_size is None else block_size
    set_seed(rargs.seed)  # a from-scratch model must be identical on every rank and every resume
    model = load_model(margs, tokenizer, config)
    if (
        getattr(margs, "model_dtype", None) not in (None, "auto")
        and getattr(margs, "model_name_or_path", None) is None
    ):
        model = model.to(getattr(torch, margs.model_dtype))
    return tokenizer, model


def sample_cap(margs: Any, rargs: Any) -> int | None:
    """How many blocks the pass takes: ``--max_samples`` and ``train``'s ``--max_train_samples`` /
    ``--max_eval_samples`` (all three keep the first blocks of the split), the smallest that is set."""
    split_cap = getattr(margs, "max_train_samples" if rargs.split == "train" else "max_eval_samples", None)
    caps = [c for c in (rargs.max_samples, split_cap) if c is not None]
    return min(caps) if caps else None


def open_source_for_pass(margs: Any, rargs: Any) -> DocumentSource | None:
    """With ``--streaming``: the split's document stream (nothing tokenized yet); None without it.

    Cheap, so the pass calls it before the model loads: what streaming cannot reproduce is refused here.
    """
    if not getattr(rargs, "streaming", False):
        return None
    if getattr(margs, "preprocessing_num_workers", None):
        # Each worker groups its own contiguous shard, so worker runs cut other blocks than 1000-doc chunks.
        raise UserFacingError(
            "--streaming tokenizes in one process, giving the blocks of a run without "
            "--preprocessing_num_workers; drop --preprocessing_num_workers (or --streaming)"
        )
    from hf_gradext.data.streaming import streaming_source

    return streaming_source(margs, rargs.split)


def open_blocks_for_pass(margs: Any, rargs: Any, tokenizer: Any, source: DocumentSource | None = None) -> Any:
    """The ``--split``'s blocks cut to :func:`sample_cap`: a :class:`BlockStream` that tokenizes while it is
    read (``--streaming``, or a cap), else the fully tokenized ``datasets.Dataset`` (cached by datasets)."""
    from hf_gradext.data.streaming import BlockStream, arrow_source

    cap = sample_cap(margs, rargs)
    if source is None:
        source = open_source_for_pass(margs, rargs)
    # Worker processes cut their own blocks (see above): with them a cap keeps the full tokenization.
    if source is None and cap is not None and not getattr(margs, "preprocessing_num_workers", None):
        source = arrow_source(margs, rargs.split)
    if source is not None:
        return BlockStream(source, tokenizer, margs.block_size, max_blocks=cap, split_name=rargs.split)
    return _tokenized_split(margs, rargs, tokenizer)


def load_data_for_pass(margs: Any, rargs: Any, tokenizer: Any) -> Any:
    """The ``--split`` of the tokenized blocks, cut to ``--max_samples``, as a ``datasets.Dataset``.

    A streamed or capped split is held in memory: for small passes and inspection; the pass itself
    (:func:`run_projection`) reads :func:`open_blocks_for_pass` as it goes.
    """
    from hf_gradext.data.streaming import BlockStream, blocks_dataset

    data = open_blocks_for_pass(margs, rargs, tokenizer)
    return blocks_dataset(data) if isinstance(data, BlockStream) else data


def _tokenized_split(margs: Any, rargs: Any, tokenizer: Any) -> Any:
    from hf_gradext.data import build_datasets

    train, evaluation = build_datasets(margs, tokenizer, block_size=margs.block_size)
    data = train if rargs.split == "train" else evaluation
    if data is None:
        raise UserFacingError(
            "--split validation: the data has no validation split; set --validation_split_percentage"
        )
    if rargs.max_samples is not None:
        data = data.select(range(min(rargs.max_samples, len(data))))
    return data


@dataclass
class _Work:
    """This rank's share of the pass: its batches (dicts of columns), the bar's total and what was skipped."""

    batches: Iterable[dict[str, list[Any]]]
    total: int | None  # examples this rank will project, when known ahead
    skipped: Callable[[], int]  # examples already done (complete once ``batches`` is exhausted)
    estimate: Callable[[int], int | None] | None = None  # examples done so far -> estimated total


def _plan_work(data: Any, done: set[int], rank: int, world: int, batch_size: int) -> _Work:
    """Every rank takes every ``world``-th of the examples not yet ``done``, in example order."""
    from hf_gradext.data.streaming import BlockStream

    if isinstance(data, BlockStream):
        return _plan_stream(data, done, rank, world, batch_size)
    ids = [int(i) for i in data["example_id"]]
    todo = [pos for pos, i in enumerate(ids) if i not in done]
    mine = todo[rank::world]
    batches = (data[mine[first : first + batch_size]] for first in range(0, len(mine), batch_size))
    return _Work(batches, len(mine), lambda: len(ids) - len(todo))


def _plan_stream(stream: BlockStream, done: set[int], rank: int, world: int, batch_size: int) -> _Work:
    skipped = [0]

    def batches() -> Iterator[dict[str, list[Any]]]:
        batch: list[dict[str, Any]] = []
        todo = 0  # position among the examples still to do: the same share as todo[rank::world]
        for block in stream:
            if block["example_id"] in done:
                skipped[0] += 1
                continue
            if todo % world == rank:
                batch.append(block)
            todo += 1
            if len(batch) == batch_size:
                yield _columns(batch)
                batch = []
        if batch:
            yield _columns(batch)

    total = estimate = None
    if stream.max_blocks is not None:  # exact unless the split has fewer blocks than the cap
        todo_count = stream.max_blocks - sum(1 for i in done if 0 <= i < stream.max_blocks)
        total = len(range(rank, todo_count, world))
    else:

        def estimate(examples: int) -> int | None:
            # This rank's examples per document read so far, times the split's documents (when known).
            length, read = stream.source.length, stream.documents_read
            return max(examples, round(examples * length / read)) if length and read else None

    return _Work(batches(), total, lambda: skipped[0], estimate)


def _columns(blocks: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Rows to columns, the shape ``Dataset[positions]`` returns."""
    return {key: [block[key] for block in blocks] for key in blocks[0]}


def run_projection(margs: Any, pargs: Any, rargs: ProjectRunArguments) -> dict[str, Any]:
    """The dataset pass (see module doc). Returns the merged stats written to ``projection_stats.json``."""
    from accelerate import PartialState

    from hf_gradext.store import ensure_writable_dir

    state = PartialState(cpu=rargs.device == "cpu")
    rank, world = state.process_index, state.num_processes
    device = torch.device(state.device if rargs.device == "auto" else rargs.device)
    directory = Path(rargs.output_dir)
    out = projection_output(directory, *FLAGS)
    mode = rargs.mode()
    refuse_fresh_into_rows(out, mode)  # before any model or data is loaded (read-only: every rank agrees)
    source = open_source_for_pass(margs, rargs)  # --streaming: refused combinations fail before the model
    if state.is_main_process:
        ensure_writable_dir(directory, FLAGS[0])
    state.wait_for_everyone()
    with state.main_process_first():
        tokenizer, model = load_model_for_pass(margs, rargs, getattr(margs, "block_size", None))
    model.to(device).eval()
    projector = projector_from_args(model, pargs)  # a bad --proj_layers fails here, before the data
    with state.main_process_first():
        data = open_blocks_for_pass(margs, rargs, tokenizer, source)
    meta = projector.metadata()
    if state.is_main_process:  # the others wait: nothing is read or written before the directory is settled
        settings = {**row_settings(meta), "data": data_settings(margs, rargs.split)}
        prepare_output_dir(out, mode, RunFingerprint(WRITER, settings, model_fingerprint(model)))
        for stale in directory.glob(".stats-rank*.json"):  # from an earlier run, maybe another world size
            stale.unlink()
    state.wait_for_everyone()
    done = completed_example_ids(directory)  # every rank reads before any rank writes
    state.wait_for_everyone()
    if state.is_main_process:
        write_json_atomic(directory / METADATA_FILE, meta, flag=FLAGS[0])
        run_config = {
            "model_data": _plain(margs),
            "projection": _plain(pargs),
            "run": asdict(rargs),
            "world_size": world,
        }
        write_json_atomic(directory / RUN_CONFIG_FILE, run_config, flag=FLAGS[0])
    work = _plan_work(data, done, rank, world, rargs.batch_size)
    stats = _project_rows(projector, work, tokenizer, rargs, pargs, directory, rank, device, state)
    stats.update(skipped_already_done=work.skipped())
    write_json_atomic(directory / f".stats-rank{rank:03d}.json", stats, flag=FLAGS[0])
    state.wait_for_everyone()
    if not state.is_main_process:
        projector.close()
        return stats
    merged = _merge_stats(directory, world)
    write_json_atomic(directory / STATS_FILE, merged, flag=FLAGS[0])
    projector.close()
    return merged


def _plain(obj: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(obj).items() if isinstance(v, (str, int, float, bool, list, type(None)))}


def _project_rows(
    projector: KroneckerProjector,
    work: _Work,
    tokenizer: Any,
    rargs: ProjectRunArguments,
    pargs: Any,
    directory: Path,
    rank: int,
    device: torch.device,
    state: Any,
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    writer = ProjectionShardWriter(
        directory,
        rank=rank,
        save_interval=pargs.proj_save_interval,
        dtype=DTYPES[pargs.proj_dtype],
        flag="--output_dir",
    )
    kill_after = int(os.environ.get(KILL_ENV, "0"))
    bar = tqdm(
        total=work.total,  # None (a streamed split of unknown size): tqdm shows the count and rate
        unit="ex",
        disable=rargs.disable_tqdm or not state.is_local_main_process,
        desc=f"projecting (rank {rank})",
        dynamic_ncols=True,
    )
    tokens, loss_sum, batches, examples, start = 0, 0.0, 0, 0, time.perf_counter()
    in_flight: tuple[HostCopy, Any, int] | None = None  # the previous batch, its rows still copying

    def finish(copy: HostCopy, chunk: Any, batch_number: int) -> None:
        # Batch k is written while batch k + 1 runs: its copy is long done, so this does not stall.
        nonlocal loss_sum, examples
        rows, loss = copy.wait()
        batch_loss = float(loss)
        loss_sum += batch_loss
        index = [
            {
                "example_id": int(e),
                "rank": rank,
                "step": batch_number,
                "batch_loss": batch_loss,
                "snippet": _snippet(tokenizer, ids, rargs.snippet_chars),
            }
            for e, ids in zip(chunk["example_id"], chunk["input_ids"])
        ]
        writer.add(rows, index)
        examples += len(index)
        if work.estimate is not None and (estimated := work.estimate(examples)) is not None:
            bar.total = estimated  # an ETA extrapolated from the documents read so far
        bar.update(len(index))
        bar.set_postfix(
            loss=f"{batch_loss:.3f}", tok_s=f"{tokens / max(time.perf_counter() - start, 1e-9):.0f}"
        )

    try:
        for chunk in work.batches:
            batch = {
                k: _to_device(chunk[k], device)
                for k in ("input_ids", "attention_mask", "labels")
                if k in chunk
            }
            rows = projector.project(batch)  # (b, D), queued on the device
            # Token count from the host copy of the data: reading the device tensor would wait for it.
            mask = chunk.get("attention_mask")
            tokens += sum(map(sum, mask)) if mask is not None else sum(map(len, chunk["input_ids"]))
            batches += 1
            if in_flight is not None:
                finish(*in_flight)
                if kill_after and batches - 1 >= kill_after:  # test hook: die after N written batches
                    writer.writer.flush()  # what a real kill may or may not have had time to finish
                    os._exit(137)
            in_flight = (HostCopy(rows, projector.last_loss_tensor), chunk, batches - 1)
        if in_flight is not None:
            finish(*in_flight)
    finally:
        bar.close()
    writer.close()
    elapsed = time.perf_counter() - start
    return {
        "rank": rank,
        "examples": examples,
        "batches": batches,
        "tokens": tokens,
        "seconds": elapsed,
        "tokens_per_second": tokens / max(elapsed, 1e-9),
        "mean_batch_loss": loss_sum / max(batches, 1),
        "rows_written": writer.rows_written,
    }


def _to_device(values: Any, device: torch.device) -> torch.Tensor:
    """A batch column on ``device``; to a GPU through pinned memory, so the copy does not wait for the GPU
    (a plain ``.to(cuda)`` from pageable memory synchronizes the stream)."""
    tensor = torch.as_tensor(values)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _snippet(tokenizer: Any, ids: list[int], chars: int) -> str:
    if chars <= 0 or tokenizer is None:
        return ""
    return tokenizer.decode(ids[: max(chars, 1)], skip_special_tokens=True)[:chars]


def _merge_stats(directory: Path, world: int) -> dict[str, Any]:
    per_rank = []
    for path in sorted(directory.glob(".stats-rank*.json")):
        per_rank.append(read_json(path, "rerun the command (this run's statistics file is rewritten)"))
    tokens = sum(s["tokens"] for s in per_rank)
    seconds = max((s["seconds"] for s in per_rank), default=0.0)
    batches = sum(s["batches"] for s in per_rank)
    return {
        "world_size": world,
        "examples_this_run": sum(s["examples"] for s in per_rank),
        "skipped_already_done": per_rank[0]["skipped_already_done"] if per_rank else 0,
        "rows_in_directory": len(completed_example_ids(directory)),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / max(seconds, 1e-9),
        "mean_batch_loss": sum(s["mean_batch_loss"] * s["batches"] for s in per_rank) / max(batches, 1),
        "per_rank": per_rank,
    }
