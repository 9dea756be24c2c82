"""Declared ranges, tested releases and the lock file agree, and the installed set is inside them."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from hf_gradext.integrations import guard

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (CI's); 3.10 users skip this file

ROOT = Path(__file__).resolve().parents[2]


def _declared(extras: bool = False) -> dict[str, Requirement]:
    """``[project] dependencies`` (with ``extras``: and the ``dev`` extra) by lower-case name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + (project["optional-dependencies"]["dev"] if extras else [])
    reqs = [Requirement(r) for r in lines]
    return {r.name.lower(): r for r in reqs}


def _locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / "locked.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


# Guarded packages are direct dependencies, or dev extras for optional integrations (trl).
@pytest.mark.parametrize("package", sorted(guard.SUPPORTED))
def test_guard_ranges_are_the_declared_ones(package):
    declared = _declared(extras=True)[package]
    assert str(declared.specifier) == str(Requirement(package + guard.SUPPORTED[package]).specifier)


@pytest.mark.parametrize("package", sorted(guard.TESTED))
def test_oldest_tested_release_is_the_locked_floor(package):
    locked = _locked()
    assert locked[package] == guard.TESTED[package][0]
    # Every tested release is inside the declared range.
    spec = _declared(extras=True)[package].specifier
    assert all(Version(v) in spec for v in guard.TESTED[package])


def test_lock_pins_every_direct_dependency_at_its_floor():
    locked = _locked()
    # The dev extra too: lock.sh resolves it with the same lowest-direct strategy.
    for name, req in _declared(extras=True).items():
        assert name in locked, f"{name} missing from requirements/locked.txt"
        floors = [s.version for s in req.specifier if s.operator == ">="]
        if floors:
            assert Version(locked[name].split("+")[0]) == Version(floors[0]), (
                f"{name}: locked {locked[name]} is not the declared floor {floors[0]}"
            )


@pytest.mark.parametrize("package", sorted(set(guard.SUPPORTED) - set(_declared())))
def test_installed_optional_integration_is_inside_its_supported_range(package):
    version = guard.installed_version(package)
    if version == "not installed":
        pytest.skip(f"{package} is not installed (an optional dev extra)")
    assert Version(version) in Requirement(package + guard.SUPPORTED[package]).specifier


@pytest.mark.parametrize("package", sorted(_declared()))
def test_installed_release_is_inside_the_declared_range(package):
    version = metadata.version(package)
    assert Version(version.split("+")[0]) in _declared()[package].specifier


def test_drift_error_names_touchpoint_version_and_fix():
    err = guard.drift_error("Trainer._run_epoch", "transformers", "it is never called")
    text = str(err)
    assert "\n" not in text
    assert "Trainer._run_epoch" in text
    assert metadata.version("transformers") in text
    assert ">=5.23,<6" in text


def test_drift_error_outside_range_says_install_a_supported_release(monkeypatch):
    monkeypatch.setattr(guard, "installed_version", lambda package: "4.57.0")
    text = str(guard.drift_error("x", "transformers", "gone"))
    assert "pip install 'transformers>=5.23,<6'" in text


def test_check_once_caches_a_pass_and_reports_exceptions_as_drift():
    calls = []

    def ok():
        calls.append(1)

    guard.check_once("test.touchpoint.ok", "transformers", ok)
    guard.check_once("test.touchpoint.ok", "transformers", ok)
    assert calls == [1]
    with pytest.raises(guard.IntegrationError, match="test.touchpoint.bad: AttributeError"):
        guard.check_once("test.touchpoint.bad", "transformers", lambda: object().nope)


def test_missing_parameters():
    def f(a, b=1, *, c=2):
        pass

    assert guard.missing_parameters(f, ["a", "c"]) is None
    assert "lacks d" in guard.missing_parameters(f, ["a", "d"])
    assert guard.missing_parameters(None, ["a"]) == "the function does not exist"
