"""Checks for what hf_gradext assumes of transformers / accelerate / peft internals.

Every private API the package touches is a *touchpoint*: a name (``"Trainer._run_epoch"``), the
package it belongs to, and a check of what we rely on (an attribute exists, a signature has certain
parameters, a function returns a certain shape). A check runs once per process; when it fails it raises
:class:`IntegrationError`, one line naming the touchpoint, the installed version and the supported range.
There is never a fallback to different behaviour: a drift stops the run instead of changing numbers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import Any

from hf_gradext.errors import UserFacingError

# What the integration layer is tested against (CI: the locked set and the newest allowed releases).
# Keep in step with pyproject.toml's dependency ranges (trl: its dev extra); tests/integrations check that
# they agree.
SUPPORTED: dict[str, str] = {
    "transformers": ">=5.23,<6",
    "accelerate": ">=1.15,<2",
    "peft": ">=0.21,<1",
    "datasets": ">=5.2",
    "trl": ">=1.16,<2",  # optional (dev extra): only GradExtSFTTrainer imports it
}

# The releases CI runs the suite on: the locked set (requirements/locked.txt, also the floors) and the
# newest ones the ranges allow. tests/integrations checks these against the lock file.
TESTED: dict[str, tuple[str, ...]] = {
    "transformers": ("5.23.0", "5.24.0", "5.25.0"),
    "accelerate": ("1.15.0", "1.16.0"),
    "peft": ("0.21.0", "0.21.2"),
    "datasets": ("5.2.0",),
    "trl": ("1.16.0",),
}

_passed: set[str] = set()


class IntegrationError(UserFacingError):
    """An internal of transformers / accelerate / peft is not what hf_gradext was built against."""


def installed_version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def drift_error(touchpoint: str, package: str, problem: str) -> IntegrationError:
    """The one-line error of a broken assumption (also used by runtime checks, e.g. the GQC loop)."""
    supported = SUPPORTED.get(package, "")
    version = installed_version(package)
    tested = TESTED.get(package, ())
    if tested and not _in_range(version, supported):
        fix = f"install a supported release: pip install '{package}{supported}'"
    else:
        # Inside the declared range but broken: a new release drifted. The tested ones are known good.
        fix = f"install a tested release ({package}=={tested[-1] if tested else '?'}) or report this drift"
    return IntegrationError(
        f"{touchpoint}: {problem} in {package} {version} (hf_gradext {_own_version()} supports "
        f"{package}{supported}, tested on {', '.join(tested) or 'nothing'}); {fix}"
    )


def _in_range(version: str, spec: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) in SpecifierSet(spec)
    except InvalidVersion:
        return False


def _own_version() -> str:
    from hf_gradext import __version__

    return __version__


def check_once(touchpoint: str, package: str, check: Callable[[], str | None]) -> None:
    """Run ``check`` the first time ``touchpoint`` is used; it returns None or what is wrong.

    Raises:
        IntegrationError: ``check`` reported a problem (it runs again next time: nothing is cached).
    """
    if touchpoint in _passed:
        return
    try:
        problem = check()
    except Exception as exc:  # an import or attribute error *is* the drift we are looking for
        problem = f"{type(exc).__name__}: {exc}".splitlines()[0]
    if problem:
        raise drift_error(touchpoint, package, problem)
    _passed.add(touchpoint)


def reset_checks() -> None:
    """Forget which checks passed (tests simulate a drift after a check already ran)."""
    _passed.clear()


def missing_parameters(func: Any, expected: Iterable[str]) -> str | None:
    """None when ``func`` takes every name in ``expected`` (positional-or-keyword or keyword), else why not."""
    if func is None:
        return "the function does not exist"
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return "its signature cannot be read"
    missing = [name for name in expected if name not in params]
    if missing:
        return f"its signature lacks {', '.join(missing)} (has {', '.join(params) or 'nothing'})"
    return None


def positional_parameters(func: Any) -> list[str]:
    """Parameter names in order, ``self`` excluded."""
    params = list(inspect.signature(func).parameters.values())
    return [p.name for p in params if p.name != "self"]


def require_attribute(owner: Any, name: str, what: str | None = None) -> str | None:
    """None when ``owner`` has ``name``, else a problem string for :func:`check_once`."""
    if getattr(owner, name, None) is None:
        label = what or f"{getattr(owner, '__qualname__', type(owner).__name__)}.{name}"
        return f"{label} does not exist"
    return None
