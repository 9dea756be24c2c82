"""Causal-mask cache for HF GPT-2 (eager and sdpa attention).

What transformers 5.23 does per forward (``masking_utils.create_causal_mask``) in the training case:

* no ``attention_mask``: ``find_packed_sequence_indices`` diffs the position ids and branches on
  ``(...).all()`` -> one host-device sync per forward (eager and sdpa); eager then builds a fresh
  ``(B, 1, T, T)`` float mask (arange, compare, expand, ``where``);
* an all-ones 2D ``attention_mask`` with sdpa: ``fast_all(mask)`` -> one sync, then ``None``
  (``is_causal=True``); with padding a second sync, then a fresh ``(B, 1, T, T)`` bool mask;
* a 2D mask with eager: no sync, a fresh ``(B, 1, T, T)`` float mask.

What the patch does instead:

* no ``attention_mask`` and no user ``position_ids`` (GPT-2 would build ``arange(T)`` itself): zero
  syncs. The ``GPT2Model.forward`` wrapper passes a cached ``arange(T)`` as ``position_ids``; seeing that
  exact tensor object proves the positions are the default ones (so no packed sequences), without
  reading any value. sdpa gets ``None`` (``is_causal``), eager a cached ``(1, 1, T, T)`` mask expanded
  to ``(B, 1, T, T)`` (a view, no copy).
* a 2D ``attention_mask`` (padding possible): only the padding-independent causal part is cached; the
  padding is applied fresh every call, so a mask is never reused across different padding. sdpa keeps
  exactly one sync (``mask.all()``, needed to choose the flash/``is_causal`` path), eager none.
* anything else (a KV cache, 4D or custom masks, packed ``position_ids``, other attention
  implementations, ``torch.compile`` tracing): transformers' own function, unchanged.

The cache is process-wide, bounded (LRU, :data:`MAX_ENTRIES`), keyed by (kind, sequence length, dtype,
device, attention implementation); :func:`clear_mask_cache` empties it.
"""

from __future__ import annotations

import functools
import inspect
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from transformers.models.gpt2 import modeling_gpt2

from hf_gradext.integrations.gpt2 import CACHE_NAMES  # the KV-cache names transformers has used
from hf_gradext.patches.gpt2_config import is_gpt2_config

MAX_ENTRIES = 32

_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_stats = {"hits": 0, "misses": 0, "fallbacks": 0}
# name -> the transformers object we replaced, present only while installed
_originals: dict[str, Any] = {}
# The class-level choice (apply_gradext_to_gpt2(model=None, causal_mask_cache=True)).
_class_default = {"on": False}
MASK_CACHE_KEY = "gradext_causal_mask_cache"


def clear_mask_cache() -> None:
    """Drop every cached mask / position tensor and reset the hit counters."""
    _cache.clear()
    for key in _stats:
        _stats[key] = 0


def mask_cache_info() -> dict[str, int]:
    """``hits``, ``misses`` (cache lookups), ``fallbacks`` (calls handed to transformers), ``entries``."""
    return {**_stats, "entries": len(_cache), "max_entries": MAX_ENTRIES}


def _cached(key: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    tensor = _cache.get(key)
    if tensor is not None:
        _stats["hits"] += 1
        _cache.move_to_end(key)
        return tensor
    _stats["misses"] += 1
    # Built outside inference mode: a tensor first made during evaluation must stay usable (and
    # savable for backward) in training.
    with torch.inference_mode(False), torch.no_grad():
        tensor = build()
    _cache[key] = tensor
    while len(_cache) > MAX_ENTRIES:
        _cache.popitem(last=False)
    return tensor


def default_position_ids(seq_len: int, device: torch.device) -> torch.Tensor:
    """The ``(1, T)`` int64 ``arange`` GPT-2 builds when no positions are given, cached per (T, device)."""
    return _cached(
        ("positions", seq_len, device),
        lambda: torch.arange(seq_len, device=device, dtype=torch.long).unsqueeze(0),
    )


def _causal_bool(seq_len: int, device: torch.device) -> torch.Tensor:
    # (1, 1, T, T), True where query i may attend key j <= i
    return _cached(
        ("causal_bool", seq_len, device),
        lambda: torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()[None, None],
    )


def _causal_float(seq_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # (1, 1, T, T): 0 where allowed, finfo(dtype).min elsewhere (what HF's eager_mask produces)
    def build() -> torch.Tensor:
        allowed = _causal_bool(seq_len, device)
        return torch.where(allowed, torch.zeros((), dtype=dtype, device=device), torch.finfo(dtype).min)

    return _cached(("causal_float", seq_len, dtype, device), build)


def wants_mask_cache(config: Any) -> bool:
    """Whether the model owning ``config`` asked for the cache.

    ``config.gradext_causal_mask_cache`` (set by ``apply_gradext_to_gpt2(model=...)``) decides; a config
    without the key follows the class-level default (``apply_gradext_to_gpt2(model=None)`` /
    :func:`install_mask_cache`). Models that did not ask get transformers' mask creation untouched.
    """
    flag = getattr(config, MASK_CACHE_KEY, None)
    return bool(_class_default["on"] if flag is None else flag)


def cached_create_causal_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """Drop-in for ``transformers.masking_utils.create_causal_mask`` as GPT-2 calls it.

    Takes the arguments under transformers' own names (the KV cache is ``past_key_values`` on 5.23 and
    ``cache`` from 5.24: bound to the real signature, never assumed). Returns exactly what transformers
    would return (same values, same shape up to broadcasting views), with fewer host-device syncs and
    no per-call mask construction where it can; see the module docstring for the cases.
    """
    original = _originals["create_causal_mask"]
    call_args, call_kwargs = args, kwargs

    def fallback() -> torch.Tensor | None:
        _stats["fallbacks"] += 1
        return original(*call_args, **call_kwargs)

    try:
        bound = _original_signature().bind(*args, **kwargs)
    except TypeError:  # e.g. a deprecated argument name: transformers' own handling applies
        return fallback()
    bound.apply_defaults()
    arguments = bound.arguments
    config = arguments["config"]
    if not wants_mask_cache(config):
        return original(*args, **kwargs)
    inputs_embeds = arguments["inputs_embeds"]
    attention_mask = arguments["attention_mask"]
    position_ids = arguments.get("position_ids")
    has_cache = any(arguments.get(name) is not None for name in CACHE_NAMES)
    options = dict(arguments.get("kwargs", {}))  # the **kwargs part, then named options
    for name in ("or_mask_function", "and_mask_function", "allow_is_causal_skip", "block_sequence_ids"):
        if name in arguments:
            options[name] = arguments[name]
    impl = getattr(config, "_attn_implementation", None)
    custom = any(
        options.get(k) is not None for k in ("or_mask_function", "and_mask_function", "block_sequence_ids")
    )
    if (
        impl not in ("eager", "sdpa")
        or has_cache
        or custom
        or not getattr(config, "is_causal", True)
        or torch.compiler.is_compiling()
    ):
        return fallback()
    batch, seq_len = inputs_embeds.shape[:2]
    dtype, device = inputs_embeds.dtype, inputs_embeds.device
    allow_skip = options.get("allow_is_causal_skip", True)

    if attention_mask is None:
        # Only the default positions prove "no packed sequences" without reading values.
        if position_ids is None or position_ids is not _cache.get(("positions", seq_len, device)):
            return fallback()
        if impl == "sdpa":
            if allow_skip:
                return None  # sdpa runs with is_causal=True, as transformers decides here
            return _causal_bool(seq_len, device).expand(batch, 1, seq_len, seq_len)
        return _causal_float(seq_len, dtype, device).expand(batch, 1, seq_len, seq_len)

    if attention_mask.ndim != 2 or attention_mask.shape[-1] != seq_len:
        # 4D (prepared) masks and prefix-style masks longer than the input: transformers' rules.
        return fallback()
    keep = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, T)
    if impl == "sdpa":
        # The one sync transformers also pays: with no padding sdpa can take its is_causal path.
        if allow_skip and bool(keep.all()):
            return None
        return _causal_bool(seq_len, device) & keep  # (B, 1, T, T)
    return torch.where(keep, _causal_float(seq_len, dtype, device), torch.finfo(dtype).min)  # (B, 1, T, T)


def _forward_with_default_positions(forward: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``GPT2Model.forward`` so that default positions arrive as the cached ``arange`` object."""

    @functools.wraps(forward)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        # GPT2Model.forward(input_ids, past_key_values | cache, attention_mask, ...): only touch calls
        # that pass nothing but input_ids positionally and leave position_ids and the KV cache unset
        # (under either name: a decode step must keep transformers' past-length offset).
        if (
            wants_mask_cache(self.config)
            and len(args) <= 1
            and kwargs.get("position_ids") is None
            and all(kwargs.get(name) is None for name in CACHE_NAMES)
            and not torch.compiler.is_compiling()
        ):
            input_ids = args[0] if args else kwargs.get("input_ids")
            embeds = kwargs.get("inputs_embeds")
            if input_ids is not None:
                kwargs["position_ids"] = default_position_ids(input_ids.shape[-1], input_ids.device)
            elif embeds is not None:
                kwargs["position_ids"] = default_position_ids(embeds.shape[-2], embeds.device)
        return forward(self, *args, **kwargs)

    return wrapped


def _original_signature() -> inspect.Signature:
    sig = _originals.get("signature")
    if sig is None:
        sig = _originals["signature"] = inspect.signature(_originals["create_causal_mask"])
    return sig


def install_hook() -> None:
    """Put the cache in GPT-2's mask path; inert for every model that did not ask (idempotent).

    Raises:
        IntegrationError: transformers' mask creation / GPT-2 forward are not what the cache assumes.
    """
    from hf_gradext.integrations.gpt2 import check_mask_cache_touchpoints

    check_mask_cache_touchpoints()
    if _originals:
        return
    _originals["create_causal_mask"] = modeling_gpt2.create_causal_mask
    _originals["forward"] = modeling_gpt2.GPT2Model.forward
    modeling_gpt2.create_causal_mask = cached_create_causal_mask
    modeling_gpt2.GPT2Model.forward = _forward_with_default_positions(modeling_gpt2.GPT2Model.forward)


def install_mask_cache() -> None:
    """Class level: GPT-2 models whose config does not state a choice use the cache (idempotent)."""
    install_hook()
    _class_default["on"] = True


def enable_for_model(model: Any, on: bool = True) -> None:
    """Instance level: record the choice in the config of every ``GPT2Model`` config of ``model``."""
    if on:
        install_hook()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and is_gpt2_config(config):
            setattr(config, MASK_CACHE_KEY, bool(on))


def uninstall_mask_cache() -> None:
    """Restore transformers' own mask creation and drop the cache (idempotent)."""
    _class_default["on"] = False
    if not _originals:
        return
    modeling_gpt2.create_causal_mask = _originals.pop("create_causal_mask")
    modeling_gpt2.GPT2Model.forward = _originals.pop("forward")
    _originals.clear()
    clear_mask_cache()


def is_mask_cache_installed() -> bool:
    return bool(_originals)
