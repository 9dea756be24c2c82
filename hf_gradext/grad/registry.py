"""Registry of per-layer per-sample gradient math, looked up by module type.

One file per layer family registers a function with the fixed signature::

    @register_layer_math(nn.Linear)
    def linear_math(
        module: nn.Module, a: Tensor, g: Tensor, trainable: Trainable = requires_grad
    ) -> dict[str, Contribution]: ...

mapping the *local* names of the module's trainable parameters (``"weight"``, ``"bias"``) to their
per-sample gradient contributions (:mod:`hf_gradext.grad.factors`). ``a`` is what the forward hook saw as
the module's first input and ``g`` the gradient w.r.t. its output, both with a leading batch dim.

Which parameters are trainable is asked of ``trainable(param)``, never read from ``param.requires_grad``
directly: a ``CaptureEngine(weight_grads=False)`` freezes every parameter while it is armed, so inside the
backward ``requires_grad`` no longer says what the user trains; the engine passes a predicate answering
from the state recorded before it froze them. Math registered without a ``trainable`` parameter still
works (:func:`evaluate_math` calls it with three arguments and drops the parameters ``trainable`` rejects),
but it then sees the frozen flags when called during such a capture.

Classes from packages we must not import in the math (HF ``Conv1D``) are registered by class *name*
(``"*RMSNorm"`` matches a name suffix);
lookup walks the module's MRO, so subclasses inherit their parent's math.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache, partial

from torch import Tensor, nn

from hf_gradext.grad.factors import Contribution

Trainable = Callable[[nn.Parameter], bool]
# math(module, a, g[, trainable=...]) -> {local parameter name: contribution}
LayerMath = Callable[..., dict[str, Contribution]]


def requires_grad(param: nn.Parameter) -> bool:
    """The default ``trainable`` predicate: the parameter's current ``requires_grad``."""
    return param.requires_grad


@cache
def _accepts_trainable(math: LayerMath) -> bool:
    try:
        params = inspect.signature(math).parameters
    except (TypeError, ValueError):  # builtins / C callables: assume the old three-argument form
        return False
    return "trainable" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def evaluate_math(
    math: LayerMath, module: nn.Module, a: Tensor, g: Tensor, trainable: Trainable = requires_grad
) -> dict[str, Contribution]:
    """``math(module, a, g)`` restricted to the parameters ``trainable`` accepts.

    Math written before the ``trainable`` argument existed is called with three arguments and its result
    filtered, so a parameter the user froze is never reported whichever form the math has.
    """
    if _accepts_trainable(math):
        return math(module, a, g, trainable=trainable)
    out = math(module, a, g)
    return {local: c for local, c in out.items() if trainable(getattr(module, local))}


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

    def bind(self, trainable: Trainable) -> LayerSpec:
        """This spec with ``math(module, a, g)`` evaluated against ``trainable`` (an engine's record)."""
        return replace(self, math=partial(evaluate_math, self.math, trainable=trainable))


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
