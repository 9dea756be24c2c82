"""One output-directory policy for every writer of rows (collection, projection, ``project``, ``full-grads``).

A writer starts in one of three modes:

* ``fresh``: the directory must hold no rows of this writer. Rows of an earlier run are refused with a
  one-line error naming the overwrite flag, the resume flag and the directory flag: two runs' rows are
  never mixed, and nothing is deleted unless asked.
* ``overwrite``: the earlier rows and their side files (metadata, stats, caches) are removed, each removal
  logged, then the run starts as a fresh one. Files that are not this writer's are left alone.
* ``resume``: the rows must come from this very run. The directory's fingerprint file
  (``run_fingerprint.json``, written when a run starts and updated at every checkpoint) must show the same
  writer, the same settings (every setting that determines the rows: layers, dimensions, seed, dtype ...)
  and the same model weights at the step resumed from; anything else is refused with the difference.

Model fingerprint (:func:`model_fingerprint`): sha256 over, for every parameter in registration order, its
name, shape and dtype, then 64 elements taken at an even stride through the flattened tensor, as raw bytes
of its own dtype. Cheap (one gather and one device->host copy of 64 values per parameter, whatever the
model size), identical on every process and device for the same weights (integer strides, raw bytes, no
float arithmetic), and it changes with the architecture (names, shapes), the dtype, and any training
step or other initialization (every sampled value moves). It is a guard against mistakes, not against
an adversary: an edit that leaves every sampled element as it was goes unseen.

A training run changes its weights, so the fingerprint file maps steps to fingerprints: step 0 at the
start, then every checkpoint step (:func:`record_model`); resuming from checkpoint ``k`` compares the
loaded weights with the entry for ``k``.

Ranks: every rank may call :func:`prepare_output_dir` (its checks only read); on ``overwrite`` each rank
removes its own rank's shards, rank 0 those of ranks beyond the world size and the shared side files; only
rank 0 writes the fingerprint file (atomically: temporary name + ``os.replace``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_gradext.errors import UserFacingError
from hf_gradext.store.integrity import damaged, read_json
from hf_gradext.store.shards import ensure_writable_dir, list_shards, write_json_atomic

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "run_fingerprint.json"
FORMAT = 1
MODES = ("fresh", "overwrite", "resume")
SAMPLES_PER_TENSOR = 64
FINGERPRINT_METHOD = (
    f"sha256 over (name, shape, dtype) and {SAMPLES_PER_TENSOR} evenly strided elements (raw bytes) of "
    "every parameter, in registration order"
)


class OutputDirConflict(UserFacingError):
    """The directory holds rows this run may not write next to (another run, other settings, other model)."""


@dataclass(frozen=True)
class OutputDir:
    """A directory a writer keeps rows in, and the flags a user has to steer it.

    Args:
        path: the directory.
        prefix: shard prefix of the rows (``{prefix}-rankNNN-SSSSSS.safetensors``).
        flag: the flag that chose ``path`` (named in errors).
        overwrite_flag / resume_flag: the flags that select ``overwrite`` / ``resume``.
        side_files: glob patterns (relative to ``path``) of the files that describe the rows: removed with
            them on overwrite, and when a fresh run finds them without rows.
    """

    path: Path
    prefix: str
    flag: str
    overwrite_flag: str
    resume_flag: str
    side_files: tuple[str, ...] = ()

    def where(self) -> str:
        return f"{self.flag}={self.path}"


@dataclass(frozen=True)
class RunFingerprint:
    """What a resumed run must share with the run that wrote the rows."""

    writer: str  # e.g. "gradient_collection"
    settings: dict[str, Any] = field(default_factory=dict)  # JSON-able; compared key by key
    model: str = ""  # model_fingerprint() of the weights at the step the run starts from


def choose_mode(overwrite: bool, resume: bool, overwrite_flag: str, resume_flag: str) -> str:
    """``fresh`` / ``overwrite`` / ``resume`` from two boolean flags (both at once is an error)."""
    if overwrite and resume:
        raise UserFacingError(f"{overwrite_flag} and {resume_flag} exclude each other; pass one of them")
    return "overwrite" if overwrite else "resume" if resume else "fresh"


# ----------------------------------------------------------------------------------------- fingerprints
def model_fingerprint(model: nn.Module) -> str:
    """A cheap, deterministic fingerprint of ``model``'s parameters (see the module doc)."""
    digest = hashlib.sha256()
    samples: list[torch.Tensor] = []
    for name, param in model.named_parameters():
        tensor = param.detach()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        numel = tensor.numel()
        if numel == 0 or tensor.is_meta:
            continue
        k = min(numel, SAMPLES_PER_TENSOR)
        index = torch.arange(k, dtype=torch.long) * numel // k  # integer stride: the same on every device
        picked = tensor.reshape(-1)[index.to(tensor.device)].contiguous()
        samples.append(picked.view(torch.uint8) if picked.dtype != torch.bool else picked.to(torch.uint8))
    if samples:
        digest.update(torch.cat(samples).cpu().numpy().tobytes())  # one device->host copy
    return "sha256:" + digest.hexdigest()


def _plain(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists ...), so comparisons see what is stored."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def read_fingerprint(directory: str | os.PathLike, fix: str | None = None) -> dict[str, Any] | None:
    """The directory's fingerprint file, or None when it has none.

    Raises:
        DamagedFileError: the file exists but is not a JSON object (``fix``: what to tell the user).
    """
    path = Path(directory) / FINGERPRINT_FILE
    if not path.is_file():
        return None
    fix = (
        fix or "delete the directory's rows and this file (or pass the overwrite flag) to start the rows over"
    )
    manifest = read_json(path, fix)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("models", {}), dict):
        raise damaged(path, "not a fingerprint record", fix)
    return manifest


def _write(out: OutputDir, fingerprint: RunFingerprint, models: dict[str, str]) -> None:
    write_json_atomic(
        out.path / FINGERPRINT_FILE,
        {
            "format": FORMAT,
            "writer": fingerprint.writer,
            "fingerprint_method": FINGERPRINT_METHOD,
            "settings": _plain(fingerprint.settings),
            "models": models,  # step -> model fingerprint of the weights at that step
        },
        flag=out.flag,
    )


def record_model(out: OutputDir, step: int, model_fp: str) -> None:
    """Add the weights at ``step`` (a checkpoint about to be saved) to the fingerprint file (rank 0 only)."""
    manifest = read_fingerprint(out.path, f"pass {out.overwrite_flag} to start the rows over")
    if manifest is None:  # the policy was not applied to this directory: nothing to extend
        return
    models = dict(manifest.get("models", {}))
    if models.get(str(step)) == model_fp:
        return
    models[str(step)] = model_fp
    write_json_atomic(out.path / FINGERPRINT_FILE, {**manifest, "models": models}, flag=out.flag)


# ---------------------------------------------------------------------------------------------- policy
def _rows(out: OutputDir) -> list[Any]:
    return list_shards(out.path, out.prefix)


def refuse_fresh_into_rows(out: OutputDir, mode: str) -> None:
    """The cheap part of the policy, callable before any model is loaded: a fresh run into rows refuses."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    if mode != "fresh":
        return
    rows = _rows(out)
    if rows:
        raise OutputDirConflict(
            f"{out.where()} already holds {len(rows)} shard(s) of an earlier run; pass {out.overwrite_flag} "
            f"to replace them, {out.resume_flag} to continue that run, or choose another {out.flag}"
        )


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_resume(out: OutputDir, fingerprint: RunFingerprint, step: int, rows: int) -> dict[str, Any]:
    fix = f"pass {out.overwrite_flag} to replace them or choose another {out.flag}"
    manifest = read_fingerprint(out.path, f"pass {out.overwrite_flag} to start the rows over")
    if manifest is None:
        raise OutputDirConflict(
            f"{out.where()} holds {rows} shard(s) but no {FINGERPRINT_FILE}, so {out.resume_flag} cannot check "
            f"they come from this run; {fix}"
        )
    if manifest.get("writer") != fingerprint.writer:
        raise OutputDirConflict(
            f"{out.where()} holds rows of {manifest.get('writer')!r}, not {fingerprint.writer!r}; {fix}"
        )
    old, new = manifest.get("settings", {}), _plain(fingerprint.settings)
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed:
        diff = ", ".join(f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in changed[:4])
        raise OutputDirConflict(
            f"{out.where()} holds rows written with other settings ({diff}); {out.resume_flag} needs the same "
            f"ones; {fix}"
        )
    models = manifest.get("models", {})
    recorded = models.get(str(step))
    at = f" at step {step}" if step else ""
    if recorded is None:
        steps = sorted(int(s) for s in models)
        raise OutputDirConflict(
            f"{out.where()} has no record of the model{at} (recorded steps: {steps}), so its rows are not "
            f"this run's; {fix}"
        )
    if recorded != fingerprint.model:
        raise OutputDirConflict(
            f"{out.where()} holds rows of another model (weights fingerprint{at} {recorded[7:19]}, this "
            f"model's {fingerprint.model[7:19]}); {fix}"
        )
    return manifest


def _remove(paths: Iterable[Path], out: OutputDir, why: str) -> None:
    removed = [p for p in paths if p.exists()]
    for path in removed:
        path.unlink()
    if removed:
        names = ", ".join(p.name for p in removed[:5]) + (" ..." if len(removed) > 5 else "")
        logger.warning("%s: removed %d file(s) from %s (%s)", why, len(removed), out.where(), names)


def _side_files(out: OutputDir) -> list[Path]:
    found = [p for pattern in out.side_files for p in sorted(out.path.glob(pattern)) if p.is_file()]
    return found + [out.path / FINGERPRINT_FILE]


def prepare_output_dir(
    out: OutputDir,
    mode: str,
    fingerprint: RunFingerprint,
    *,
    step: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> None:
    """Apply the policy (see the module doc) before the first row is written.

    Args:
        out: the directory and its flags. mode: ``fresh``, ``overwrite`` or ``resume``.
        fingerprint: this run's writer, settings and model fingerprint at ``step``.
        step: the step the run starts from (a training run resumed from checkpoint ``k``: ``k``).
        rank / world_size: this process; see the module doc for who removes and writes what.

    Raises:
        OutputDirConflict: fresh into another run's rows; resume into rows of other settings or weights.
        UserFacingError: the directory cannot be created or written (names ``out.flag``).
    """
    refuse_fresh_into_rows(out, mode)
    ensure_writable_dir(out.path, out.flag)
    rows = _rows(out)
    models = {str(step): fingerprint.model}
    if mode == "overwrite":
        mine = [s.path for s in rows if s.rank == rank or (rank == 0 and s.rank >= world_size)]
        _remove(mine, out, f"{out.overwrite_flag}: rows of an earlier run")
        if rank == 0:
            _remove(_side_files(out), out, f"{out.overwrite_flag}: files of an earlier run")
    elif mode == "resume" and rows:
        manifest = _check_resume(out, fingerprint, step, len(rows))
        # Checkpoints after ``step`` belong to the abandoned continuation: their rows are recomputed.
        models = {k: v for k, v in manifest.get("models", {}).items() if int(k) <= step} | models
    elif rank == 0:  # no rows at all: what describes rows here describes nothing any more
        _remove(_side_files(out)[:-1], out, "no rows left: stale files of an earlier run")
    if rank == 0:
        _write(out, fingerprint, models)


# ------------------------------------------------------------------------------------- training runs
OVERWRITE_OUTPUT_DIR = "--overwrite_output_dir"
RESUME_FROM_CHECKPOINT = "--resume_from_checkpoint"


def training_mode(args: Any, state: Any) -> str:
    """The mode of a writer inside ``Trainer.train`` (call it from ``on_train_begin``).

    ``--overwrite_output_dir`` wins (with a resumed run too: its rows are discarded and the record starts at
    the resumed step); otherwise a run resumed from a checkpoint (``global_step > 0`` once HF loaded it)
    resumes, and any other run is fresh.
    """
    if getattr(args, "overwrite_output_dir", False):
        return "overwrite"
    return "resume" if int(state.global_step) > 0 else "fresh"
