"""The safetensors container read by hand, with every bound checked before any byte is trusted.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON (per tensor: dtype,
shape, ``data_offsets`` into the data section; plus ``__metadata__``: str -> str), then the data section.
:func:`parse_header` checks that the header fits in the file, parses as JSON, and that every tensor's
bytes (shape x dtype size) lie inside the file. That makes two things safe:

* memory-mapping a tensor (``numpy.memmap`` at its offset): a truncated file would otherwise raise
  ``SIGBUS`` when a page past its end is touched, killing the process without a message;
* reporting damage as one line naming the file, instead of safetensors' ``SafetensorError`` tracebacks.

:func:`write_safetensors` writes the same container (read back by ``safetensors.safe_open``), with the
checksums of the tensors computed slice by slice as their bytes are written.
"""

from __future__ import annotations

import json
import math
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from hf_gradext.store.integrity import PLACEHOLDER, damaged, new_hasher, tensor_bytes

# safetensors dtype tag -> bytes per element
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U64": 8, "U32": 4, "U16": 2, "C64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
}  # fmt: skip
DTYPE_TAGS = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    size: int  # file size in bytes


def parse_header(path: str | os.PathLike, fix: str) -> Header:
    """Parse and bound-check a safetensors header (no tensor byte is read).

    Raises:
        DamagedFileError: truncated, not a safetensors file, or a tensor outside the file (names ``path``).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise damaged(path, f"{size} bytes, shorter than a safetensors header", fix)
            (length,) = struct.unpack("<Q", head)
            if length > min(_MAX_HEADER, size - 8):
                raise damaged(path, f"header of {length} bytes in a file of {size} (truncated?)", fix)
            raw = handle.read(length)
    except OSError as exc:
        raise damaged(path, f"cannot be read: {exc.strerror or exc}", fix) from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise damaged(path, f"unreadable header: {str(exc)[:80]}", fix) from None
    data_start = 8 + length
    meta = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorEntry] = {}
    for key, entry in header.items():
        try:
            dtype, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
            begin, stop = (int(x) for x in entry["data_offsets"])
            width = DTYPE_SIZES[dtype]
        except (KeyError, TypeError, ValueError):
            raise damaged(path, f"bad header entry for tensor {key!r}", fix) from None
        if min(shape, default=0) < 0 or stop - begin != math.prod(shape) * width or begin < 0:
            raise damaged(path, f"tensor {key!r}: shape {list(shape)} does not match its byte range", fix)
        if data_start + stop > size:
            raise damaged(path, f"tensor {key!r} ends past the end of the file (truncated)", fix)
        tensors[key] = TensorEntry(dtype, shape, data_start + begin, data_start + stop)
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise damaged(path, "header metadata is not a string map", fix)
    return Header(path, tensors, meta, size)


def read_range(path: Path, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of a file (for checksums of regions already bound-checked)."""
    with open(path, "rb") as handle:
        handle.seek(start)
        return handle.read(end - start)


# ------------------------------------------------------------------------------------------------ writing
# Each tensor goes to the file in slices of this size, and each slice is hashed right after it is
# written, while its bytes are still in the CPU cache: hashing then costs compute, not a second trip
# through memory (a separate pass over cold bytes costs ~20% of the write on a loaded 2-core machine).
SLICE_BYTES = 256 * 1024


def write_safetensors(
    handle: BinaryIO,
    tensors: dict[str, torch.Tensor],
    metadata_for: Callable[[dict[str, str] | None], dict[str, str]],
    checksums: bool,
) -> float:
    """Write a safetensors file to ``handle``; the header may carry checksums of the tensor bytes.

    Why not ``safetensors.torch.save_file``: it needs the metadata (so the checksums) before it starts, so
    hashing would be one more pass before the write; and it copies every tensor into one buffer first.
    Here the tensor bytes go to the file straight from the tensors (no copy), each slice hashed as it is
    written (:data:`SLICE_BYTES`), and the header, written with fixed-width placeholders first, is
    rewritten in place once the checksums are known.

    Args:
        handle: a file opened ``wb`` (position 0).
        tensors: contiguous CPU tensors.
        metadata_for: the ``__metadata__`` map for given per-key checksums (``None``: no checksums); must
            serialize to the same length for :data:`PLACEHOLDER` and real checksums.
        checksums: write checksums.

    Returns:
        CPU seconds spent hashing (part of the write's own time).
    """
    keys = sorted(tensors)
    entries, offset = {}, 0
    for key in keys:
        tag = DTYPE_TAGS.get(tensors[key].dtype)
        if tag is None:
            raise TypeError(f"tensor {key!r}: dtype {tensors[key].dtype} cannot be stored")
        size = tensors[key].numel() * tensors[key].element_size()
        entries[key] = {
            "dtype": tag,
            "shape": list(tensors[key].shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size

    def header(sums: dict[str, str] | None) -> bytes:
        raw = json.dumps({"__metadata__": metadata_for(sums), **entries}, separators=(",", ":")).encode()
        return raw + b" " * (-len(raw) % 8)  # 8-byte aligned data, as safetensors writes it

    first = header({key: PLACEHOLDER for key in keys} if checksums else None)
    handle.write(struct.pack("<Q", len(first)))
    handle.write(first)
    sums, hashing = {}, 0.0
    for key in keys:
        data = tensor_bytes(tensors[key])  # (n_bytes,) uint8, zero-copy
        hasher = new_hasher() if checksums else None
        for begin in range(0, data.size, SLICE_BYTES):
            piece = data[begin : begin + SLICE_BYTES]
            handle.write(piece)
            if hasher is not None:
                start = time.thread_time()
                hasher.update(piece)
                hashing += time.thread_time() - start
        if hasher is not None:
            sums[key] = hasher.hexdigest()
    if not checksums:
        return 0.0
    final = header(sums)
    if len(final) != len(first):  # cannot happen with fixed-width checksums; never write a bad header
        raise RuntimeError("checksummed header changed length")
    handle.seek(8)
    handle.write(final)
    handle.seek(0, os.SEEK_END)
    return hashing
