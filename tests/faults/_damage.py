"""Fault injection helpers: damage a file the way disks and killed processes do, and check the error.

Every fault test asserts the same three things: the call fails (exit code 2 for CLI cases) with ONE line
that names the damaged file (or the flag of the directory), and everything written before the fault still
reads back equal.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path

import pytest


def truncate(path: Path, keep: int | float) -> None:
    """Keep the first ``keep`` bytes (an int) or that fraction of the file (a float)."""
    size = path.stat().st_size
    n = keep if isinstance(keep, int) else int(size * keep)
    with open(path, "rb+") as handle:
        handle.truncate(n)


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    """Flip one bit at byte ``offset`` (negative: from the end)."""
    with open(path, "rb+") as handle:
        handle.seek(offset if offset >= 0 else path.stat().st_size + offset)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ (1 << bit)]))


def safetensors_data_offset(path: Path) -> int:
    """Where the tensor bytes of a safetensors file start."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
    return 8 + length


def find(path: Path, needle: bytes, after: int = 0) -> int:
    data = path.read_bytes()
    at = data.find(needle, after)
    assert at >= 0, f"{needle!r} not in {path}"
    return at


def flip_digit(path: Path, needle: bytes) -> None:
    """Change one ASCII digit right after ``needle`` by one bit (the JSON stays valid)."""
    at = find(path, needle) + len(needle)
    data = path.read_bytes()
    while not chr(data[at]).isdigit():
        at += 1
    flip_bit(path, at, 0)  # '0' <-> '1', '2' <-> '3', ...
    assert chr(path.read_bytes()[at]).isdigit()


def assert_one_line(message: str, *names: str) -> None:
    """One line, naming each of ``names`` (file names, flags)."""
    message = message.strip()
    assert "\n" not in message, message
    assert "Traceback" not in message, message
    for name in names:
        assert name in message, (name, message)


def assert_cli_error(code: int, capsys, *names: str) -> str:
    """Exit code 2 and exactly one ``error:`` line on stderr, naming ``names``; returns it."""
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert_one_line(lines[0], *names)
    return lines[0]


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def erofs(*args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system")


def read_json(path: Path):
    return json.loads(path.read_text())


needs_non_root = pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions"
)
