"""Out-of-space and read-only conditions as one-line errors naming the path and the flag.

* :func:`ensure_writable_dir`: create a directory and prove it can take data (a 64 KiB probe, fsynced),
  called by every writer when it starts; :func:`probe_writable` proves the same without creating anything,
  called by ``train`` for every output directory before any model or data is loaded. A read-only
  directory or a disk with a few KiB left fails there, not hours later in the first checkpoint.
* :func:`require_free_space`: before a file of known size is created (a cache), so that a full disk is an
  error message and never a ``SIGBUS`` of a memory map whose pages cannot be allocated.
* :func:`disk_errors`: turns what a full / read-only disk raises deep inside torch, safetensors or the
  Trainer (``OSError``, torch's ``RuntimeError: ... file write failed``, safetensors' ``IoError``) into one
  line naming the path and the flag.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hf_gradext.errors import UserFacingError
from hf_gradext.store.temp import remove_stale_temporaries

PROBE_BYTES = 64 * 1024
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}
# What torch / safetensors put in the message of a non-OSError raised by a failed write.
_FULL_MARKERS = ("no space left", "storagefull", "disk quota", "file too large")
_WRITE_MARKERS = ("file write failed", "ioerror", "read-only file system", "permission denied")


class DiskError(UserFacingError):
    """A write failed because the disk is full, read-only or refuses permission; names the path and flag."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.strerror or os.strerror(exc.errno)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:120]


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in _FULL:
        return True
    return any(marker in str(exc).lower() for marker in _FULL_MARKERS)


def is_disk_error(exc: BaseException) -> bool:
    """Whether ``exc`` says a write failed because of the disk (full, read-only, permissions, I/O)."""
    if isinstance(exc, OSError):
        return exc.errno in _FULL | _READ_ONLY | {errno.EIO}
    text = str(exc).lower()
    return any(marker in text for marker in _FULL_MARKERS + _WRITE_MARKERS)


def _fix(exc: BaseException, flag: str) -> str:
    if is_disk_full(exc):
        return f"free disk space or choose another {flag or 'directory'}"
    return f"choose a writable {flag or 'directory'}"


def disk_error(path: str | os.PathLike, flag: str, exc: BaseException, what: str = "writing") -> DiskError:
    """One line: what failed, where, why, and the fix (free space, or another directory)."""
    where = f"{flag}={path}" if flag else str(path)
    return DiskError(f"{what} {where} failed ({_reason(exc)}); {_fix(exc, flag)}")


@contextmanager
def disk_errors(path: str | os.PathLike, flag: str, what: str = "writing") -> Iterator[None]:
    """Re-raise disk failures inside the block as :func:`disk_error` (other exceptions pass through)."""
    try:
        yield
    except UserFacingError:
        raise
    except Exception as exc:
        if is_disk_error(exc):
            raise disk_error(path, flag, exc, what) from exc
        raise


def _probe(base: Path) -> None:
    probe = base / f".hf_gradext-write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"\0" * PROBE_BYTES)
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def probe_writable(directory: str | os.PathLike, flag: str) -> None:
    """Prove ``directory`` takes data without creating it: when it does not exist yet, its nearest existing
    parent (where it will be created) is probed. Leaves nothing behind (a run refused later, e.g. for a bad
    data file, must not leave an empty output directory).

    Raises:
        DiskError / UserFacingError: one line naming ``flag`` and the fix.
    """
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise UserFacingError(f"{flag}={path} is a file, not a directory; pass a directory path")
    base = path
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise UserFacingError(f"{flag}={path} cannot be created: {base} is a file; pass a directory path")
    try:
        if base == path:
            remove_stale_temporaries(path)
        _probe(base)
    except OSError as exc:
        raise DiskError(f"{flag}={path} is not writable ({_reason(exc)}); {_fix(exc, flag)}") from None


def ensure_writable_dir(directory: str | os.PathLike, flag: str) -> Path:
    """Create ``directory`` and prove it takes data, or raise a one-line error naming ``flag``.

    Also removes the temporaries that dead processes left there (see :mod:`hf_gradext.store.temp`), before
    the probe: on a disk they filled, they are what stands between the run and the space it needs.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserFacingError(f"{flag}={directory} is a file, not a directory; pass a directory path")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(directory)
        _probe(directory)
    except OSError as exc:
        raise DiskError(f"{flag}={directory} is not writable ({_reason(exc)}); {_fix(exc, flag)}") from None
    return directory


def free_bytes(directory: str | os.PathLike) -> int:
    """Bytes available to this user on the file system of ``directory`` (its nearest existing parent)."""
    path = Path(directory)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def require_free_space(directory: str | os.PathLike, needed: int, what: str, fix: str) -> None:
    """Raise a one-line error when ``directory``'s file system has less than ``needed`` bytes free."""
    free = free_bytes(directory)
    if free < needed:
        raise UserFacingError(
            f"{what} needs {_size(needed)} in {directory} but only {_size(free)} are free; {fix}"
        )


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
