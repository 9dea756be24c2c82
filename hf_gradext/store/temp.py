"""Temporary names of files being written, and the removal of those a dead process left behind.

Every atomic writer of the package writes ``.{name}.tmp-{pid}`` next to ``name`` and renames it into place
when complete; on failure it removes it. A process killed mid-write (or by a signal) cannot clean up, so
each writer, when it starts, removes the temporaries in its directory whose process is gone: a stale
temporary is never read, but it holds disk space (on a full disk: exactly the space the next run needs).

A temporary whose process is still alive is left alone (another writer is using it). PIDs are those of
this machine: on a file system shared between machines, a live writer on another machine whose PID is not
alive here would look stale, so directories shared that way must not be written by two machines at once
(ranks are: each rank's shard writer removes only its own rank's temporaries, see ``ShardWriter``).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

_TMP_RE = re.compile(r"^\..+\.tmp-(?P<pid>\d+)$")


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary name under which ``path`` is written (same directory, so ``os.replace`` is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this machine."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True  # unknown: keep the file
    return True


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove ``.*.tmp-PID`` files in ``directory`` (not recursive) whose PID is not alive; returns them."""
    directory = Path(directory)
    removed: list[Path] = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TMP_RE.match(entry.name)
        if not match or pid_alive(int(match["pid"])):
            continue
        try:
            if entry.is_file() and not entry.is_symlink():
                entry.unlink()
                removed.append(entry)
        except OSError:  # read-only directory, or removed meanwhile: nothing to do here
            continue
    if removed:
        logger.info(
            "removed %d stale temporary file(s) of dead processes from %s (%s)",
            len(removed),
            directory,
            ", ".join(p.name for p in removed[:3]) + (" ..." if len(removed) > 3 else ""),
        )
    return removed
