"""What every benchmark script here shares: model sizes, run metadata, timing, the long-format CSV.

Imported as ``import _common`` (the scripts run as ``python recipes/benchmarks/<script>.py``, which puts
this folder first on ``sys.path``). Torch and transformers are imported lazily so that a script can parse
its flags (and set thread counts / environment) before they load.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import os
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# Column order of every benchmark CSV (long format: one measurement per row).
CSV_FIELDS = (
    "benchmark",
    "variant",
    "metric",
    "value",
    "unit",
    "device",
    "torch",
    "transformers",
    "date",
    "config",
)

# GPT-2 sizes the per-sample / collection / projection benchmarks share (``--model``).
GPT2_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 1000, "n_positions": 128},
    "gpt2-small": {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024},
}


def run_metadata(device: str, *, cpu_cores: bool = False, timestamp: bool = False) -> dict[str, str]:
    """The ``device``/``torch``/``transformers``/``date`` columns of this run.

    Args:
        device: ``"cpu"`` or a CUDA device string; CUDA is reported by its device name.
        cpu_cores: on CPU, report ``"cpu (N cores)"`` instead of ``"cpu"``.
        timestamp: a UTC ``YYYY-MM-DDTHH:MM:SSZ`` timestamp instead of the ISO date.
    """
    import torch
    import transformers

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu ({os.cpu_count()} cores)" if cpu_cores else "cpu"
    if timestamp:
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    else:
        date = datetime.date.today().isoformat()
    return {
        "device": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": date,
    }


def proc_status_kib(field: str, pid: int | str = "self") -> int | None:
    """A ``/proc/<pid>/status`` memory field in KiB (``VmRSS``, ``VmHWM``); ``None`` without /proc or the field."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def row(common: dict[str, Any], variant: str, metric: str, value: Any, unit: str) -> dict[str, Any]:
    """One long-format record: the run's shared columns (``benchmark``, metadata, ``config``) + one value."""
    return {**common, "variant": variant, "metric": metric, "value": value, "unit": unit}


def write_csv(path: str | os.PathLike, rows: Iterable[dict[str, Any]], append: bool = False) -> Path:
    """Write ``rows`` (dicts with the ``CSV_FIELDS`` keys) as a long-format CSV, atomically.

    With ``append`` the rows go after those already in ``path`` (header kept). Either way the file is
    written under a temporary name and moved into place, so a crash never leaves a half-written CSV.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        if append and path.exists():
            with path.open(newline="") as existing:  # the rows as they are: no line-ending rewrite
                handle.write(existing.read())
        else:
            csv.DictWriter(handle, fieldnames=CSV_FIELDS).writeheader()
        csv.DictWriter(handle, fieldnames=CSV_FIELDS).writerows(rows)
    os.replace(tmp, path)
    return path


def sync(device: str) -> None:
    """Wait for queued CUDA work (a no-op on CPU), so wall-clock time covers the device's work."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def autocast(device: str, bf16: bool) -> contextlib.AbstractContextManager:
    """A fresh bf16 autocast context for ``device`` when ``bf16``, else a no-op context."""
    if not bf16:
        return contextlib.nullcontext()
    import torch

    return torch.autocast(str(device).split(":")[0], dtype=torch.bfloat16)


def summarize(values: list[float], quartiles: bool = False) -> dict[str, float]:
    """``median``/``min``/``max`` of ``values`` (plus ``q1``/``q3`` with ``quartiles``)."""
    stats = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    if quartiles:
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        stats.update(q1=q[0], q3=q[2])
    return stats


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    rounds: int,
    reps: int = 1,
    inner: int = 1,
    warmup: int = 0,
    device: str = "cpu",
    before_round: Callable[[str], None] | None = None,
    after_round: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Milliseconds per call of each function, timed round-robin so machine drift hits all alike.

    First ``warmup`` untimed calls of each function (interleaved); then ``rounds`` rounds, in each of which
    every function in turn gets ``reps`` samples. One sample is the mean over ``inner`` consecutive calls,
    device-synchronized at both ends (what a call returns is dropped inside the timed region).
    ``before_round`` / ``after_round`` run untimed around each function's turn in a round (e.g. to reset
    and read CUDA peak-memory counters).

    Returns:
        ``{name: [ms per call, one entry per sample]}``, ``rounds * reps`` entries each.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if before_round is not None:
                before_round(name)
            for _ in range(reps):
                sync(device)
                start = time.perf_counter()
                for _ in range(inner):
                    fn()
                sync(device)
                times[name].append((time.perf_counter() - start) * 1e3 / inner)
            if after_round is not None:
                after_round(name)
    return times
