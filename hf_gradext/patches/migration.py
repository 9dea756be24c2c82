"""Checkpoints of earlier hf_gradext versions: RMSNorm / SwiGLU saved as ``model_type: "gpt2"``.

Those ``config.json`` files carry ``gradext_rms_norm`` / ``gradext_swiglu`` on a plain GPT-2 type, which
only rebuilt correctly through construction hooks that changed every GPT-2 class in the process. Any
process without them (stock transformers, or hf_gradext now) builds stock GPT-2 from such a config and
fills the MLPs with random weights, with nothing but a "missing keys" warning. So:

* :func:`check_not_legacy_checkpoint` refuses them with one line naming the fix (hf_gradext's loading
  path and :func:`~hf_gradext.patches.apply_from_args` call it);
* :func:`migrate_checkpoint` rewrites ``config.json`` once to ``model_type: "gpt2_gradext"`` (the
  weights need no change: the parameter names are the same).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from hf_gradext.errors import UserFacingError
from hf_gradext.patches.gpt2_config import MODEL_TYPE, RMS_NORM_KEY, SWIGLU_KEY

CONFIG_NAME = "config.json"
# architectures entry of a legacy config -> the patched class that replaces it
_ARCHITECTURES = {"GPT2LMHeadModel": "GradExtGPT2LMHeadModel", "GPT2Model": "GradExtGPT2Model"}


def _config_file(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    return path / CONFIG_NAME if path.is_dir() else path


def is_legacy_config(config: Any) -> bool:
    """True for a ``model_type: "gpt2"`` config (dict or object) with RMSNorm or SwiGLU switched on."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    return get("model_type") == "gpt2" and bool(get(RMS_NORM_KEY, False) or get(SWIGLU_KEY, False))


def _migration_hint(where: str) -> str:
    return (
        f"{where} is a GPT-2 checkpoint with RMSNorm/SwiGLU saved by an earlier hf_gradext as model_type "
        "'gpt2', which transformers loads as stock GPT-2 with random MLP weights; convert it once with "
        f"python -c \"from hf_gradext.patches import migrate_checkpoint; migrate_checkpoint('{where}')\""
    )


def check_not_legacy_checkpoint(path_or_config: Any) -> None:
    """Refuse a legacy patched checkpoint (see the module doc); anything else passes.

    Args:
        path_or_config: a checkpoint directory or its ``config.json`` (a path that does not exist
            locally, e.g. a Hub id, is not checked), a config dict, or a config object.

    Raises:
        UserFacingError: the checkpoint is a legacy one; the message names :func:`migrate_checkpoint`.
    """
    if isinstance(path_or_config, (str, os.PathLike)):
        file = _config_file(path_or_config)
        if not file.is_file():
            return
        try:
            config = json.loads(file.read_text())
        except (OSError, ValueError):
            return  # not ours to judge: transformers reports an unreadable config itself
        where = str(path_or_config)
    else:
        config = path_or_config
        name = None if isinstance(config, dict) else getattr(config, "_name_or_path", None)
        where = str(name) if name else "this config"
    if is_legacy_config(config):
        raise UserFacingError(_migration_hint(where))


def migrate_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Rewrite a legacy checkpoint's ``config.json`` to ``model_type: "gpt2_gradext"`` (atomically).

    Args:
        path: the checkpoint directory (or its ``config.json``).

    Returns:
        True when the file was rewritten, False when there was nothing to migrate (already
        ``gpt2_gradext``, or a checkpoint without RMSNorm/SwiGLU).

    Raises:
        UserFacingError: no ``config.json`` there, or a GPT-2 head other than ``GPT2LMHeadModel`` /
            ``GPT2Model`` (there is no patched class for it).
    """
    file = _config_file(path)
    if not file.is_file():
        raise UserFacingError(f"{path}: no {CONFIG_NAME} to migrate; pass the checkpoint directory")
    config = json.loads(file.read_text())
    if not is_legacy_config(config):
        return False
    architectures = config.get("architectures") or ["GPT2LMHeadModel"]
    unknown = [a for a in architectures if a not in _ARCHITECTURES]
    if unknown:
        raise UserFacingError(
            f"{path}: cannot migrate architecture {', '.join(unknown)}; patched classes exist for "
            f"{', '.join(_ARCHITECTURES)} only"
        )
    config["model_type"] = MODEL_TYPE
    config["architectures"] = [_ARCHITECTURES[a] for a in architectures]
    # Temp file in the same directory + os.replace: a crash leaves the old or the new file, never half.
    fd, tmp = tempfile.mkstemp(prefix=f".{CONFIG_NAME}.", suffix=".tmp", dir=file.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, file.stat().st_mode & 0o777)
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True
