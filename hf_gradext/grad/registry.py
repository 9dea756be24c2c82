"""Registry of per-layer per-sample gradient math, looked up by module type.

One file per layer family registers a function with the fixed signature::

    @register_layer_math(nn.Linear)
    def linear_math(module: nn.Module, a: Tensor, g: Tensor) -> dict[str, Contribution]: ...

mapping the *local* names of the module's trainable parameters (``"weight"``, ``"bias"``) to their
per-sample gradient contributions (:mod:`hf_gradext.grad.factors`). ``a`` is what the forward hook saw as
the module's first input and ``g`` the gradient w.r.t. its output, both with a leading batch dim.

Classes from packages we must not import in the math (HF ``Conv1D``) are registered by class *name*
(``"*RMSNorm"`` matches a name suffix);
lookup walks the module's MRO, so subclasses inherit their parent's math.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from hf_gradext.grad.factors import Contribution

LayerMath = Callable[[nn.Module, Tensor, Tensor], dict[str, Contribution]]


@dataclass(frozen=True)
class LayerSpec:
    """How to treat one layer family.

    Attributes:
        family: ``"linear"``, ``"embedding"``, ``"norm"``, ... (selection groups use it).
        math: the contribution function.
        autocast_input: the layer runs under autocast in the low-precision dtype, so the captured input
            can be stored in that dtype (what the layer actually multiplied with, and half the memory).
    """

    family: str
    math: LayerMath
    autocast_input: bool = False


_BY_TYPE: dict[type, LayerSpec] = {}
_BY_NAME: dict[str, LayerSpec] = {}
_BY_SUFFIX: dict[str, LayerSpec] = {}  # "*RMSNorm": every class whose name ends with "RMSNorm"


def register_layer_math(
    *types: type | str, family: str, autocast_input: bool = False
) -> Callable[[LayerMath], LayerMath]:
    """Decorator registering ``math`` for module classes (or class names, for optional dependencies)."""

    def deco(math: LayerMath) -> LayerMath:
        spec = LayerSpec(family, math, autocast_input)
        for t in types:
            if isinstance(t, str) and t.startswith("*"):
                _BY_SUFFIX[t[1:]] = spec
            elif isinstance(t, str):
                _BY_NAME[t] = spec
            else:
                _BY_TYPE[t] = spec
        return math

    return deco


def lookup(module: nn.Module) -> LayerSpec | None:
    """The math registered for ``type(module)`` or its nearest registered base class, else ``None``."""
    _ensure_loaded()
    for cls in type(module).__mro__:
        if cls in _BY_TYPE:
            return _BY_TYPE[cls]
        if cls.__name__ in _BY_NAME:
            return _BY_NAME[cls.__name__]
        for suffix, spec in _BY_SUFFIX.items():
            if cls.__name__.endswith(suffix):
                return spec
    return None


_LOADED = False


def _ensure_loaded() -> None:
    # The layer files register themselves on import; import them lazily to avoid import cycles.
    global _LOADED
    if not _LOADED:
        _LOADED = True
        from hf_gradext.grad import conv1d, embedding, linear, norm  # noqa: F401
