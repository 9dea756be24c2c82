"""Which ``checkpoint-*`` folders finished saving, so a resume never starts from a half-written one."""

from __future__ import annotations

import json
import logging
import os
import re

logger = logging.getLogger(__name__)

_CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
TRAINER_STATE_FILE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME, written last in a checkpoint


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
