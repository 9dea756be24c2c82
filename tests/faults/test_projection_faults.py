"""Projection directories: metadata.json, run_fingerprint.json, ``proj`` shards and the row cache.

Readers: ``load_projections`` (memmap; the row cache), ``iter_projection_blocks``, ``hf-gradext attribute``
and ``hf-gradext analyze projection-error`` (exit code 2 and one line naming the file).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hf_gradext.cli import main as cli_main
from hf_gradext.errors import UserFacingError
from hf_gradext.projection import row_cache
from hf_gradext.projection.io import (
    ProjectionShardWriter,
    iter_projection_blocks,
    load_projections,
    projection_output,
    row_settings,
    write_json_atomic,
)
from hf_gradext.store import DamagedFileError, list_shards, read_shard
from hf_gradext.store.policy import RunFingerprint, prepare_output_dir
from tests.faults._damage import (
    assert_cli_error,
    assert_one_line,
    enospc,
    flip_bit,
    flip_digit,
    safetensors_data_offset,
    truncate,
)

DIM = 6
META = {
    "total_proj_dim": DIM,
    "layers": [],
    "proj_seed": 42,
    "proj_method": "kronecker",
    "package_version": "x",
}


def _row(i: int) -> torch.Tensor:
    return torch.arange(DIM, dtype=torch.float32) + 100 * i  # a row encodes its example id


def make_projection_dir(directory: Path, ids_per_rank=((0, 2, 4, 6), (1, 3, 5))) -> Path:
    """A projection directory as a run leaves it: fingerprint, metadata, shards of two ranks."""
    out = projection_output(
        directory, "--proj_output_dir", "--overwrite_output_dir", "--resume_from_checkpoint"
    )
    prepare_output_dir(out, "fresh", RunFingerprint("project", row_settings(META), "sha256:" + "0" * 64))
    write_json_atomic(directory / "metadata.json", META)
    for rank, ids in enumerate(ids_per_rank):
        writer = ProjectionShardWriter(directory, rank=rank, save_interval=2, dtype=torch.float32)
        for i in ids:
            writer.add(_row(i)[None], [{"example_id": i, "step": 0}])
        writer.close()
    return directory


def _expected(ids) -> torch.Tensor:
    return torch.stack([_row(i) for i in ids])


@pytest.fixture
def proj(tmp_path):
    return make_projection_dir(tmp_path / "proj")


def _cache_files(directory: Path) -> list[Path]:
    return sorted((directory / ".cache").glob("rows-*.bin"))


# ---------------------------------------------------------------------------------------- metadata.json
METADATA_FAULTS = {
    "truncated": (lambda p: truncate(p, 0.5), "structure"),
    "empty": (lambda p: truncate(p, 0), "structure"),
    "not_utf8": (lambda p: p.write_bytes(b"\xff\xfe{}"), "structure"),
    "not_an_object": (lambda p: p.write_text("[1, 2]"), "structure"),
    # valid JSON, another seed: caught against the settings run_fingerprint.json recorded with the rows
    "bit_flip_seed_digit": (lambda p: flip_digit(p, b'"proj_seed": '), "checksum"),
}


@pytest.mark.parametrize("case", list(METADATA_FAULTS))
def test_damaged_metadata_is_one_line_and_attribute_exits_2(proj, capsys, case):
    METADATA_FAULTS[case][0](proj / "metadata.json")
    with pytest.raises(UserFacingError) as err:
        load_projections(proj)
    assert_one_line(str(err.value), "metadata.json")
    code = cli_main(
        ["attribute", "--train", str(proj), "--query", str(proj), "--output", str(proj.parent / "a")]
    )
    assert_cli_error(code, capsys, "metadata.json")
    for info in list_shards(proj, "proj"):  # the rows themselves are untouched
        rows = read_shard(info.path)[1]
        assert torch.equal(read_shard(info.path)[0]["proj"], _expected([r["example_id"] for r in rows]))


def test_damaged_fingerprint_only_loses_the_cross_check(proj, caplog):
    (proj / "run_fingerprint.json").write_text('{"format": 1, "wri')
    with caplog.at_level("WARNING"):
        rows, ids, _ = load_projections(proj)
    assert ids == list(range(7)) and torch.equal(rows, _expected(range(7)))
    assert "run_fingerprint.json" in caplog.text


def test_damaged_fingerprint_refuses_a_resume_in_one_line(proj):
    (proj / "run_fingerprint.json").write_text('{"format": 1, "wri')
    out = projection_output(proj, "--output_dir", "--overwrite", "--resume")
    with pytest.raises(DamagedFileError) as err:
        prepare_output_dir(out, "resume", RunFingerprint("project", row_settings(META), "sha256:" + "0" * 64))
    assert_one_line(str(err.value), "run_fingerprint.json", "--overwrite")


# ------------------------------------------------------------------------------------------- proj shards
PROJ_SHARD_FAULTS = {
    "truncated": (lambda p: truncate(p, 0.7), "structure"),
    "bit_flip_row_value": (lambda p: flip_bit(p, safetensors_data_offset(p) + 2, 5), "checksum"),
    "bit_flip_example_id": (lambda p: flip_digit(p, b"example_id"), "checksum"),
}


@pytest.mark.parametrize("case", list(PROJ_SHARD_FAULTS))
@pytest.mark.parametrize("reader", ["memmap_one_shard", "row_cache", "blocks", "attribute_cli"])
def test_damaged_proj_shard_is_named_by_every_reader(tmp_path, capsys, case, reader):
    single = reader == "memmap_one_shard"
    directory = make_projection_dir(
        tmp_path / "p", ids_per_rank=((0, 1),) if single else ((0, 2, 4, 6), (1, 3, 5))
    )
    shards = [info.path for info in list_shards(directory, "proj")]
    bad = shards[0] if single else shards[1]
    PROJ_SHARD_FAULTS[case][0](bad)
    if reader == "attribute_cli":
        code = cli_main(
            [
                "attribute",
                "--train",
                str(directory),
                "--query",
                str(directory),
                "--output",
                str(tmp_path / "a"),
            ]
        )
        assert_cli_error(code, capsys, bad.name)
    else:
        with pytest.raises(DamagedFileError) as err:
            if reader == "blocks":
                list(iter_projection_blocks(directory))
            else:
                load_projections(directory)
        assert_one_line(str(err.value), bad.name)
    assert not list((directory / ".cache").glob(".*tmp-*")) if (directory / ".cache").is_dir() else True
    for path in shards:
        if path != bad:
            tensors, rows, _ = read_shard(path)
            assert torch.equal(tensors["proj"], _expected([r["example_id"] for r in rows]))


def test_truncated_shard_never_kills_the_reader_by_signal(tmp_path):
    """A truncated shard used to be memory-mapped past its end (SIGBUS on first touch)."""
    directory = make_projection_dir(tmp_path / "p", ids_per_rank=((0, 1),))  # one shard: the zero-copy memmap
    (shard,) = [info.path for info in list_shards(directory, "proj")]
    truncate(shard, shard.stat().st_size - 8)
    script = (
        f"from hf_gradext.projection import load_projections; load_projections({str(directory)!r})[0].sum()"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "DamagedFileError" in proc.stderr and shard.name in proc.stderr


# --------------------------------------------------------------------------------------------- row cache
CACHE_FAULTS = {
    "bit_flip": (lambda p: flip_bit(p, 17, 2), "checksum"),
    "truncated": (lambda p: truncate(p, 0.5), "structure"),
    "record_damaged": (lambda p: p.with_suffix(".json").write_text("{"), "structure"),
    "record_missing": (lambda p: p.with_suffix(".json").unlink(), "structure"),
    "replaced_by_other_rows": (lambda p: p.write_bytes(bytes(p.stat().st_size)), "checksum"),
}


@pytest.mark.parametrize("case", list(CACHE_FAULTS))
def test_damaged_cache_is_rebuilt_from_the_shards(proj, caplog, case):
    rows, ids, _ = load_projections(proj)
    (cache,) = _cache_files(proj)
    del rows
    CACHE_FAULTS[case][0](cache)
    with caplog.at_level("WARNING"):
        rows, ids, _ = load_projections(proj)
    assert ids == list(range(7)) and torch.equal(rows, _expected(range(7)))
    assert "row cache" in caplog.text and "rebuilding" in caplog.text
    assert _cache_files(proj) == [cache]


def test_no_room_for_the_cache_is_one_line_and_leaves_nothing(proj, monkeypatch, capsys):
    monkeypatch.setattr(row_cache, "free_bytes", lambda path: 4096)
    with pytest.raises(UserFacingError) as err:
        load_projections(proj)
    assert_one_line(str(err.value), "HF_GRADEXT_CACHE", "row cache", str(proj))
    assert not _cache_files(proj) and not list((proj / ".cache").iterdir())
    code = cli_main(
        ["analyze", "projection-error", "--proj_dirs", str(proj), "--reference_kind", "projection",
         "--reference_dir", str(proj), "--output_dir", str(proj.parent / "err")]
    )  # fmt: skip
    assert_cli_error(code, capsys, "HF_GRADEXT_CACHE")


def test_disk_full_while_writing_the_cache_removes_the_temporary(proj, monkeypatch):
    monkeypatch.setattr(row_cache.os, "fsync", enospc)
    with pytest.raises(UserFacingError) as err:
        load_projections(proj)
    assert_one_line(str(err.value), "No space left", "HF_GRADEXT_CACHE")
    assert not list((proj / ".cache").iterdir())  # neither the temporary nor a half cache
    monkeypatch.undo()
    rows, ids, _ = load_projections(proj)  # and the next call, with room, works
    assert torch.equal(rows, _expected(range(7)))


def test_stale_cache_temporaries_of_dead_processes_are_removed(proj):
    (proj / ".cache").mkdir()
    dead = proj / ".cache" / ".rows-0123456789abcdef.bin.tmp-999999999"
    live = proj / ".cache" / f".rows-fedcba9876543210.bin.tmp-{os.getpid()}"
    dead.write_bytes(b"x" * 1000)
    live.write_bytes(b"y")
    load_projections(proj)
    assert not dead.exists() and live.exists()


def test_read_only_directory_caches_in_the_private_user_cache(proj, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_GRADEXT_CACHE", str(tmp_path / "user_cache"))
    (proj / ".cache").write_text("not a directory")  # the projection dir cannot hold the cache
    rows, ids, _ = load_projections(proj)
    assert torch.equal(rows, _expected(range(7)))
    cached = list((tmp_path / "user_cache").rglob("rows-*.bin"))
    assert len(cached) == 1
    level = cached[0].parent
    while level != tmp_path:  # every level of the user cache is private
        assert stat.S_IMODE(level.stat().st_mode) == 0o700, level
        level = level.parent


def test_user_cache_open_to_others_is_made_private(monkeypatch, tmp_path):
    from hf_gradext.store.cache_dir import private_dir

    root = tmp_path / "c"
    root.mkdir(mode=0o777)
    root.chmod(0o777)
    monkeypatch.setenv("HF_GRADEXT_CACHE", str(root))
    sub = private_dir("rows")
    assert stat.S_IMODE(root.stat().st_mode) == 0o700 and stat.S_IMODE(sub.stat().st_mode) == 0o700


def test_user_cache_of_another_user_is_refused(monkeypatch, tmp_path):
    from hf_gradext.store import cache_dir

    monkeypatch.setenv("HF_GRADEXT_CACHE", str(tmp_path / "c"))
    monkeypatch.setattr(cache_dir.os, "geteuid", lambda: os.getuid() + 1)
    with pytest.raises(UserFacingError) as err:
        cache_dir.private_dir()
    assert_one_line(str(err.value), "belongs to another user", "HF_GRADEXT_CACHE")


_REAL_DISK_FULL = textwrap.dedent(
    """
    import sys
    from hf_gradext.projection import load_projections
    try:
        load_projections(sys.argv[1])
    except Exception as exc:
        print(type(exc).__name__, exc, file=sys.stderr)
        sys.exit(2)
    """
)


def test_real_full_disk_gives_a_message_not_a_sigbus(tmp_path):
    """On a 1 MiB tmpfs (root only; skipped elsewhere): the cache does not fit, the reader says so."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        directory = mnt / "p"
        directory.mkdir()
        write_json_atomic(directory / "metadata.json", {"total_proj_dim": 4096, "layers": []})
        for rank in (0, 1):  # 2 x 32 rows x 4096 x 4 B = 1 MiB of shards: no room for a second copy
            writer = ProjectionShardWriter(directory, rank=rank, dtype=torch.float32)
            for j in range(2):
                ids = list(range(rank + 2 * 8 * j, rank + 2 * 8 * (j + 1), 2))
                writer.add(torch.ones(len(ids), 4096), [{"example_id": i} for i in ids])
                writer.write_pending()
            writer.close()
        env = {**os.environ, "HF_GRADEXT_CACHE": str(mnt / "cache")}
        proc = subprocess.run(
            [sys.executable, "-c", _REAL_DISK_FULL, str(directory)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr  # not -7 (SIGBUS)
        assert "free disk space or set HF_GRADEXT_CACHE" in proc.stderr
        assert not [p for p in mnt.rglob("*") if ".tmp-" in p.name]
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
