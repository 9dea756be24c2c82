"""Plain helpers shared by the test suite (import as ``from tests.helpers import ...``).

Fixtures wrapping these live in ``tests/conftest.py``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
# 2 processes, gloo on the CPU (see the file's header for why it says MULTI_GPU).
CPU_DDP_CONFIG = REPO_ROOT / "recipes" / "accelerate" / "cpu_ddp.yaml"

# Flags that make `hf-gradext train` on the embedded default finish in seconds.
QUICK_TRAIN_FLAGS = [
    "--max_train_samples", "64",
    "--max_eval_samples", "16",
    "--max_steps", "12",
    "--per_device_train_batch_size", "8",
    "--logging_steps", "2",
    "--save_strategy", "no",
    "--eval_strategy", "no",
    "--disable_tqdm", "true",
    "--dataloader_pin_memory", "false",
]  # fmt: skip


def make_tiny_gpt2(
    tie: bool = True,
    seed: int = 0,
    vocab_size: int = 97,
    n_positions: int = 64,
    n_layer: int = 2,
    n_embd: int = 32,
    n_head: int = 2,
    dropout: float = 0.0,
    dtype: torch.dtype | None = None,
    perturb: float = 0.0,
    training: bool | None = None,
    **overrides: Any,
):
    """A deterministic tiny ``GPT2LMHeadModel`` (dropout off by default, so forward passes are reproducible).

    Args:
        tie: tie ``lm_head`` to the token embedding.
        seed: ``torch.manual_seed`` set right before the weights are drawn.
        dropout: resid/embd/attn dropout probability.
        dtype: cast the model to this dtype (``None``: leave float32).
        perturb: add ``perturb * N(0, 1)`` to every bias and LayerNorm parameter (drawn after the weights,
            from the same seeded stream) so that formulas involving them are exercised (HF inits them to
            0 / 1).
        training: ``True`` / ``False`` put the model in train / eval mode; ``None`` leaves HF's default.
        overrides: any other ``GPT2Config`` field (``bos_token_id``, ...).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        tie_word_embeddings=tie,
        **overrides,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    if dtype is not None:
        model = model.to(dtype)
    if perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or ".ln_" in name:
                    p.add_(perturb * torch.randn_like(p))
    if training is not None:
        model.train(training)
    return model


def make_ragged_batch(
    batch_size: int | None = None,
    seq_len: int | None = None,
    vocab_size: int = 97,
    lengths: list[int] | tuple[int, ...] | None = None,
    seed: int = 0,
    pad_id: int = 0,
    min_token: int = 1,
    prompt: int = 0,
    position_ids: bool = True,
    example_id_start: int | None = None,
) -> dict[str, torch.Tensor]:
    """A right-padded causal-LM batch with per-sample lengths.

    Returns ``input_ids``/``attention_mask``/``labels`` (+ ``position_ids``, + ``example_id``), all (B, T)
    except ``example_id`` (B,); padded positions have ``attention_mask == 0`` and ``labels == -100``.

    Args:
        batch_size: B (default: ``len(lengths)``, else 3).
        seq_len: T (default: ``max(lengths)``, else 8).
        lengths: valid tokens per sample; default ``seq_len, seq_len - 1, ...`` (at least 2).
        seed: seed of the token generator (tokens are drawn for the full (B, T) grid, then padded).
        min_token: smallest token id drawn (1 keeps the pad id 0 out of the real tokens).
        prompt: additionally mask the labels of the first ``prompt`` positions (a prompt prefix).
        position_ids: include ``position_ids`` counting 0.. per sample.
        example_id_start: include ``example_id = example_id_start + arange(B)``.
    """
    if batch_size is None:
        batch_size = len(lengths) if lengths is not None else 3
    if seq_len is None:
        seq_len = max(lengths) if lengths is not None else 8
    g = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = [max(2, seq_len - i) for i in range(batch_size)]
    if len(lengths) != batch_size or max(lengths) > seq_len or min(lengths) < 1:
        raise ValueError(f"lengths {lengths} do not fit batch_size={batch_size}, seq_len={seq_len}")
    input_ids = torch.randint(min_token, vocab_size, (batch_size, seq_len), generator=g)  # (B, T)
    mask = torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
    input_ids = input_ids.masked_fill(~mask, pad_id)
    labels = input_ids.masked_fill(~mask, -100)
    labels[:, :prompt] = -100
    batch = {"input_ids": input_ids, "attention_mask": mask.long(), "labels": labels}
    if position_ids:
        batch["position_ids"] = torch.arange(seq_len).expand(batch_size, seq_len).clone()  # (B, T)
    if example_id_start is not None:
        batch["example_id"] = torch.arange(batch_size) + example_id_start  # (B,)
    return batch


def run_module(
    module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m module args...`` and capture its output (text)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=str(cwd or REPO_ROOT),
    )


def load_script(path: str | os.PathLike) -> Any:
    """Import a recipe script by its path (recipes are not a package); its folder is importable meanwhile,
    so the script's own sibling imports (``_common``, ...) resolve."""
    import importlib.util

    path = Path(path)
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(
    args: list[str], cwd: Path | None = None, timeout: float = 420, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``accelerate launch`` with the 2-process CPU config and capture its output (text).

    Args:
        args: what follows the launcher's own flags: ``["-m", module, ...]`` or ``[script, ...]``.
        cwd: working directory (default: the repository root).
        timeout: seconds before ``subprocess.TimeoutExpired`` (a hung process group fails here).
        env: extra environment variables, on top of ``os.environ`` and the CPU-only settings.
    """
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(CPU_DDP_CONFIG),
        "--main_process_port", str(free_port()),
        *args,
    ]  # fmt: skip
    # No visible GPU makes the MULTI_GPU launcher start a gloo CPU group; one thread per rank on 2 cores.
    full_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **(env or {})}
    # Own process group: on a timeout the launcher AND its workers are killed (a hung rank must not
    # outlive the test and eat the CI machine's two cores).
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        cwd=str(cwd or REPO_ROOT),
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def logged_losses(log_history: list[dict[str, Any]]) -> list[float]:
    """The training losses of a ``trainer_state.json`` log history, in order."""
    return [float(e["loss"]) for e in log_history if "loss" in e]


# Environment variables that put huggingface_hub / transformers / datasets offline (conftest sets them).
OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


class UnreachablePort:
    """A 127.0.0.1 port held bound: refusing connections (default) or accepting and never answering.

    Deterministic stand-ins for an unreachable Hub (``HF_ENDPOINT=unreachable.url``): a bound socket that
    does not listen refuses every connection (no other process can take the port meanwhile); with
    ``silent=True`` it listens, so connections succeed, but no byte is ever sent back (a hung proxy).
    Use as a context manager; ``url`` is ``http://127.0.0.1:PORT``.
    """

    def __init__(self, silent: bool = False):
        self.silent = silent
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        if silent:
            self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def __enter__(self) -> UnreachablePort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def hub_env(endpoint: str | None = None, offline: bool = False, **extra: str) -> dict[str, str]:
    """``os.environ`` with the offline switches removed (or ``HF_HUB_OFFLINE=1``), for a subprocess.

    Args:
        endpoint: ``HF_ENDPOINT`` (e.g. an :class:`UnreachablePort` url); None leaves it as it is.
        offline: set ``HF_HUB_OFFLINE=1`` instead of removing it.
        extra: more variables (``HF_HOME=...`` for an empty or prepared cache).
    """
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENV_VARS}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    if endpoint is not None:
        env["HF_ENDPOINT"] = endpoint
    env.update(extra)
    return env


def write_hub_cache(cache_dir: str | os.PathLike, repo_id: str, source_dir: str | os.PathLike) -> Path:
    """Copy a ``save_pretrained`` directory into a Hub cache as if ``repo_id`` had been downloaded.

    The layout huggingface_hub reads: ``models--ORG--NAME/snapshots/COMMIT/<files>`` and
    ``refs/main`` holding COMMIT. Returns the snapshot directory.
    """
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source_dir, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
