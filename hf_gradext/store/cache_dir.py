"""The per-user cache directory: private (mode 0700, owned by this user), so nobody else can plant files
that a later run would read.

Root: ``$HF_GRADEXT_CACHE``, else ``$XDG_CACHE_HOME/hf_gradext``, else ``~/.cache/hf_gradext``. A shared,
predictable location (``/tmp/hf_gradext-cache``, as the row cache used before) lets any local user pre-create
the file a run is about to trust; a directory only its owner can enter does not. What is read back from a
cache is still verified (size and checksum: see :mod:`hf_gradext.projection.row_cache`).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from hf_gradext.errors import UserFacingError

ENV = "HF_GRADEXT_CACHE"


def cache_root() -> Path:
    """``$HF_GRADEXT_CACHE``, else ``$XDG_CACHE_HOME/hf_gradext``, else ``~/.cache/hf_gradext``."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "hf_gradext"


def _make_private(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.lstat()
    except OSError as exc:
        raise UserFacingError(
            f"cache directory {path} cannot be created ({exc.strerror or exc}); set {ENV} to a writable directory"
        ) from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UserFacingError(f"cache directory {path} is not a plain directory; set {ENV} to another path")
    if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        raise UserFacingError(
            f"cache directory {path} belongs to another user (uid {info.st_uid}); set {ENV} to a directory of yours"
        )
    if info.st_mode & 0o077:
        try:
            path.chmod(0o700)  # ours but open to others (e.g. created by an older version): close it
        except OSError as exc:
            raise UserFacingError(
                f"cache directory {path} is open to other users and cannot be made private "
                f"({exc.strerror or exc}); set {ENV} to another directory"
            ) from None


def private_dir(*parts: str) -> Path:
    """``cache_root() / parts...``, every level created mode 0700 and checked to be this user's own.

    Raises:
        UserFacingError: the directory cannot be created, or belongs to another user (names ``$HF_GRADEXT_CACHE``).
    """
    path = cache_root()
    _make_private(path)
    for part in parts:
        path = path / part
        _make_private(path)
    return path
