"""Which ``checkpoint-*`` folders finished saving, and whether what they hold is what was saved.

* complete: transformers writes ``trainer_state.json`` last, so a folder without a readable one was cut
  short (a killed run) and is skipped by ``latest``;
* intact: after each save ``GradExtTrainer`` records the size and checksum (XXH3-128) of every file of
  the checkpoint in ``hf_gradext_checksums.json`` (:func:`write_manifest`). Before a run resumes,
  :func:`verify_checkpoint` checks them, so a flipped bit in the weights, the optimizer state or ``gqc_state.json`` is a one-line
  error naming the file, not a run resumed on weights of 5e23. A checkpoint without the record (saved by
  plain transformers or an older hf_gradext) still gets the structural checks: every ``*.json`` parses and
  every ``*.safetensors`` header fits its file (truncation).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from hf_gradext.errors import UserFacingError
from hf_gradext.store.integrity import damaged, file_checksum, file_matches, read_json
from hf_gradext.store.safetensors_file import parse_header
from hf_gradext.store.shards import write_json_atomic

logger = logging.getLogger(__name__)

_CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
TRAINER_STATE_FILE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME, written last in a checkpoint
MANIFEST_FILE = "hf_gradext_checksums.json"
GQC_STATE_FILE = "gqc_state.json"  # hf_gradext.gqc.run.GQC_STATE_NAME
MANIFEST_FORMAT = 1
# RNG states of ranks > 0 are written by those ranks, possibly after rank 0 writes the record.
_OTHER_RANKS = re.compile(r"rng_state_([1-9]\d*)\.pth")
# Checkpoints verified by this process, with the (name, size, mtime) of their files then: `train` verifies
# before loading anything and GradExtTrainer.train again (for Python callers); one pass is enough.
_VERIFIED: dict[str, tuple] = {}


def is_complete_checkpoint(path: str) -> bool:
    """Whether a ``checkpoint-*`` folder finished saving.

    transformers writes ``trainer_state.json`` last (after model, optimizer, scheduler and RNG state), so
    a folder whose state file is missing or unreadable was cut short, e.g. by a killed process.
    """
    try:
        with open(os.path.join(path, TRAINER_STATE_FILE)) as fh:
            json.load(fh)
    except (OSError, ValueError):
        return False
    return True


def newest_complete_checkpoint(output_dir: str) -> str | None:
    """The highest-step ``checkpoint-*`` of ``output_dir`` that finished saving (interrupted ones skipped)."""
    if not os.path.isdir(output_dir):
        return None
    steps = {}
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.fullmatch(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            steps[int(match.group(1))] = os.path.join(output_dir, name)
    for step in sorted(steps, reverse=True):
        if is_complete_checkpoint(steps[step]):
            return steps[step]
        logger.warning(
            "skipping %s: its save was interrupted (no readable %s)", steps[step], TRAINER_STATE_FILE
        )
    return None


def _recorded_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.name != MANIFEST_FILE
        and not _OTHER_RANKS.fullmatch(p.name)
        and ".tmp" not in p.name
    )


def write_manifest(folder: str | os.PathLike) -> None:
    """Record size and checksum of every file of a just-saved checkpoint (rank 0, after the save)."""
    folder = Path(folder)
    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "checksum": file_checksum(p)}
        for p in _recorded_files(folder)
    }
    write_json_atomic(
        folder / MANIFEST_FILE, {"format": MANIFEST_FORMAT, "files": files}, flag="--output_dir"
    )


def _fix(folder: Path) -> str:
    return (
        f"resume from an earlier checkpoint (--resume_from_checkpoint {folder.parent}/checkpoint-N) "
        "or train without --resume_from_checkpoint"
    )


def _verify_manifest(folder: Path, manifest_path: Path) -> set[str]:
    fix = _fix(folder)
    manifest = read_json(manifest_path, fix)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise damaged(manifest_path, "no file list", fix)
    for name, record in files.items():
        path = folder / name
        if not path.is_file():
            raise UserFacingError(f"{path} is missing (recorded in {MANIFEST_FILE} when saved); {fix}")
        size = path.stat().st_size
        if size != record.get("size"):
            raise damaged(
                path, f"{size} bytes, {record.get('size')} when saved: truncated or overwritten", fix
            )
        if not file_matches(path, record.get("checksum")):
            raise damaged(path, "checksum differs from the one recorded when it was saved", fix)
    return set(files)


def _check_gqc_state(path: Path, fix: str) -> None:
    if not path.is_file():
        raise UserFacingError(
            f"{path.parent} has no {GQC_STATE_FILE} (not written by a --gqc run, or written partially); resume "
            "from a checkpoint of a --gqc run or drop --resume_from_checkpoint"
        )
    state = read_json(path, fix)
    keys = ("version", "epoch", "microbatches_in_epoch", "core")
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise damaged(path, f"not a GQC state (expects {', '.join(keys)})", fix)
    if not isinstance(state["epoch"], int) or not isinstance(state["microbatches_in_epoch"], int):
        raise damaged(path, "epoch / microbatches_in_epoch are not integers", fix)


def verify_checkpoint(path: str | os.PathLike, gqc: bool = False) -> None:
    """Check a checkpoint before resuming from it (see the module doc); ``gqc``: it must hold a GQC state.

    Raises:
        DamagedFileError / UserFacingError: one line naming the damaged or missing file and the fix.
    """
    folder = Path(path)
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in _recorded_files(folder))
    if _VERIFIED.get(f"{folder.resolve()}|{gqc}") == stamp:
        return
    fix = _fix(folder)
    manifest = folder / MANIFEST_FILE
    checked = _verify_manifest(folder, manifest) if manifest.is_file() else set()
    for file in _recorded_files(folder):
        name = str(file.relative_to(folder))
        if file.suffix == ".json" and name not in checked:
            read_json(file, fix)
        elif file.suffix == ".safetensors" and name not in checked:
            parse_header(file, fix)
    if gqc:
        _check_gqc_state(folder / GQC_STATE_FILE, fix)
    _VERIFIED[f"{folder.resolve()}|{gqc}"] = stamp
