"""Where a model, tokenizer or dataset comes from, and one-line errors when it cannot be had.

Every name a user passes (``--model_name_or_path``, ``--config_name``, ``--tokenizer_name``,
``--dataset_name``) is one of:

* an existing local directory: loaded from there, the Hub is never asked;
* something path-like that does not exist (``./x``, ``/tmp/x``, ``~/x``, ``a/b/c``): a missing local
  folder, reported as such (no Hub request is made for it);
* a Hub id (``name`` or ``org/name``).

For a Hub id the Hub is probed once per process (one ``HEAD`` of the endpoint with huggingface_hub's
own HTTP client, so ``HF_ENDPOINT``, proxies and a custom client factory apply; bounded by
``HF_GRADEXT_HUB_PROBE_TIMEOUT`` seconds, default 3, ``0`` skips the probe). Without it an
unreachable Hub costs about 23 s of retries per file and prints every retry. When the probe fails,
models, configs and tokenizers are looked up in the local cache only (``local_files_only=True``), and
a dataset fails at once: ``datasets`` has no per-call cache-only switch, ``HF_HUB_OFFLINE=1`` is it.
With ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE`` / ``HF_DATASETS_OFFLINE``) nothing is probed.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hf_gradext.errors import UserFacingError

logger = logging.getLogger(__name__)

DEFAULT_PROBE_TIMEOUT = 3.0
PROBE_TIMEOUT_ENV = "HF_GRADEXT_HUB_PROBE_TIMEOUT"
OFFLINE_HINT = "set HF_HUB_OFFLINE=1 to use the local cache"

# huggingface_hub's repo id rule: [org/]name, word characters, '-' and '.', starting and ending with a
# word character, no '--' or '..', at most 96 characters.
_REPO_ID = re.compile(r"^(?:\w(?:[\w.-]*\w)?/)?\w(?:[\w.-]*\w)?$")
_probes: dict[str, HubStatus] = {}
_warned: set[str] = set()


@dataclass(frozen=True)
class HubStatus:
    """``state``: ``"offline"`` (HF_HUB_OFFLINE), ``"reachable"`` or ``"unreachable"`` (``detail`` says why)."""

    state: str
    endpoint: str
    detail: str = ""


def is_hub_id(name: str) -> bool:
    """True for a name shaped like a Hub repo id (``name`` or ``org/name``)."""
    return len(name) <= 96 and "--" not in name and ".." not in name and bool(_REPO_ID.match(name))


def check_source(flag: str, name: str) -> str:
    """``"local"`` (an existing directory) or ``"hub"`` (a Hub id).

    Raises:
        UserFacingError: ``name`` is path-like (or no valid Hub id) and no directory exists there.
    """
    if os.path.isdir(name):
        return "local"
    if name.startswith("hf://"):
        return "hub"
    if os.path.isfile(name):
        raise UserFacingError(
            f"{flag} {name!r} is a file, not a directory; pass the directory it was saved in "
            f"(save_pretrained), or a Hub id like 'org/name'"
        )
    path_like = os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
    if path_like or not is_hub_id(name):
        raise UserFacingError(
            f"{flag} {name!r}: no such local directory ({os.path.abspath(os.path.expanduser(name))}); "
            f"pass an existing directory saved with save_pretrained, or a Hub id like 'org/name'"
        )
    return "hub"


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_offline(datasets: bool = False) -> bool:
    """Offline mode as huggingface_hub (or, with ``datasets=True``, as ``datasets``) reads it."""
    if datasets:
        import datasets as ds

        return bool(ds.config.HF_HUB_OFFLINE)
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _probe_timeout() -> float:
    raw = os.environ.get(PROBE_TIMEOUT_ENV, "")
    try:
        return float(raw) if raw.strip() else DEFAULT_PROBE_TIMEOUT
    except ValueError:
        return DEFAULT_PROBE_TIMEOUT


def _probe(url: str, timeout: float) -> str | None:
    """None when ``url`` answers (any HTTP status), else a short reason; at most ``timeout`` + 1 s."""
    from huggingface_hub import get_session

    result: dict[str, BaseException | None] = {}

    def run() -> None:
        try:
            get_session().head(url, timeout=timeout)
            result["error"] = None
        except Exception as exc:  # any transport failure means "not reachable from here"
            result["error"] = exc

    # A thread bounds what the client's timeout does not cover (a hanging DNS lookup).
    thread = threading.Thread(target=run, name="hf-gradext-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if "error" not in result:
        return f"no answer within {timeout:g} s"
    exc = result["error"]
    if exc is None:
        return None
    first = (str(exc).strip().splitlines() or [""])[0][:120]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def hub_status(datasets: bool = False) -> HubStatus:
    """Offline, reachable or unreachable; the probe runs at most once per endpoint and process."""
    url = endpoint()
    if hub_offline(datasets):
        return HubStatus("offline", url)
    if url not in _probes:
        timeout = _probe_timeout()
        reason = _probe(url, timeout) if timeout > 0 else None
        _probes[url] = HubStatus("reachable" if reason is None else "unreachable", url, reason or "")
    return _probes[url]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _cache_dir(cache_dir: str | None) -> str:
    if cache_dir:
        return str(cache_dir)
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def local_dir_error(flag: str, name: str, what: str, exc: BaseException) -> UserFacingError:
    return UserFacingError(
        f"{flag} {name!r}: could not load the {what} from this directory ({_first_line(exc)}); "
        f"point it at a directory written by save_pretrained"
    )


def _is_connection_failure(exc: BaseException) -> bool:
    """True when ``exc`` or what caused it is a connection failure (offline mode raises one too)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, ConnectionError):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def hub_error(
    flag: str, name: str, what: str, exc: BaseException, status: HubStatus, cache_dir: str | None = None
) -> UserFacingError:
    """The one-line error for a Hub id that did not load, by why it could not be fetched."""
    cache = _cache_dir(cache_dir)
    # transformers raises OSError for files it could not find (or fetch); a ValueError is about content.
    missing = isinstance(exc, OSError)
    if missing and status.state == "offline":
        return UserFacingError(
            f"{flag} {name!r}: the {what} is not in the local cache ({cache}) and HF_HUB_OFFLINE=1 forbids "
            f"downloading it; download it once with network access (HF_HUB_OFFLINE unset), "
            f"or pass a local directory saved with save_pretrained"
        )
    if missing and status.state == "unreachable":
        return UserFacingError(
            f"{flag} {name!r}: the Hub ({status.endpoint}) is unreachable ({status.detail}) and the {what} "
            f"is not in the local cache ({cache}); download it into the cache with network access (then "
            f"{OFFLINE_HINT} without probing), or pass a local directory saved with save_pretrained"
        )
    return UserFacingError(
        f"{flag} {name!r}: could not load the {what} ({_first_line(exc)}); check the Hub id and "
        f"--model_revision, or pass a local directory saved with save_pretrained"
    )


def load_pretrained(loader: Callable[..., Any], name: str, *, flag: str, what: str, **kwargs: Any) -> Any:
    """``loader(name, **kwargs)`` (a ``from_pretrained``) under the policy of the module doc.

    Raises:
        UserFacingError: a missing local folder, a directory without the files, or a Hub id that is
            neither fetchable nor cached; one line naming ``flag`` and the way out.
    """
    if check_source(flag, name) == "local":
        try:
            return loader(name, **kwargs)
        except (OSError, ValueError) as exc:
            raise local_dir_error(flag, name, what, exc) from exc
    status = hub_status()
    if status.state == "unreachable":
        kwargs["local_files_only"] = True
    try:
        obj = loader(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise hub_error(flag, name, what, exc, status, kwargs.get("cache_dir")) from exc
    if status.state == "unreachable" and name not in _warned:
        _warned.add(name)
        logger.warning(
            "the Hub (%s) is unreachable (%s): using the cached %r; %s and skip this check",
            status.endpoint,
            status.detail,
            name,
            OFFLINE_HINT,
        )
    return obj


def dataset_error(name: str, exc: BaseException) -> UserFacingError:
    """The one-line error for a ``--dataset_name`` that ``load_dataset`` could not load."""
    if not os.path.isdir(name) and _is_connection_failure(exc) and hub_offline(datasets=True):
        return UserFacingError(
            f"--dataset_name {name!r}: not in the local datasets cache and HF_HUB_OFFLINE=1 forbids "
            f"downloading it; download it once with network access (HF_HUB_OFFLINE unset), or pass local "
            f"files with --train_file/--validation_file"
        )
    return UserFacingError(
        f"--dataset_name {name!r} could not be loaded ({type(exc).__name__}: {_first_line(exc)}); check the "
        f"name and --dataset_config_name, or pass local files with --train_file/--validation_file"
    )


def check_dataset_source(name: str) -> None:
    """Before ``load_dataset``: a missing local folder, or a Hub dataset while the Hub is unreachable.

    Raises:
        UserFacingError: one line with the way out (``HF_HUB_OFFLINE=1`` for a cached copy, local files).
    """
    if check_source("--dataset_name", name) == "local":
        return
    status = hub_status(datasets=True)
    if status.state == "unreachable":
        raise UserFacingError(
            f"--dataset_name {name!r}: the Hub ({status.endpoint}) is unreachable ({status.detail}); "
            f"{OFFLINE_HINT} (a dataset loaded before), or pass local files with --train_file/--validation_file"
        )


def check_sources(args: Any) -> None:
    """Check every source a run names before anything is loaded (missing folders, unreachable Hub).

    Cheap: at most one probe of the Hub. Models and tokenizers only fail here for a missing local
    folder (a cached Hub id may still load without the Hub); a Hub dataset fails here while the Hub
    is unreachable, so the run does not build its model first.
    """
    from hf_gradext.arguments.model import BUILTIN_GPT2_SIZES

    model = getattr(args, "model_name_or_path", None)
    config = getattr(args, "config_name", None)
    if config is not None and model is None and config in BUILTIN_GPT2_SIZES:
        config = None
    for flag, name in (
        ("--model_name_or_path", model),
        ("--config_name", config),
        ("--tokenizer_name", getattr(args, "tokenizer_name", None)),
    ):
        if name:
            check_source(flag, name)
    dataset = getattr(args, "dataset_name", None)
    if dataset:
        check_dataset_source(dataset)
