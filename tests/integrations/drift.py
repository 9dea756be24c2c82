"""The one assertion every drift test makes: a one-line IntegrationError naming touchpoint and version."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from hf_gradext.integrations import guard


def assert_drift(package: str, call: Callable[[], Any], touchpoint: str, *fragments: str) -> str:
    """Run ``call``; it must raise ``IntegrationError`` starting with ``touchpoint`` and naming ``package``'s
    installed version on one line, containing every fragment. Returns the message."""
    with pytest.raises(guard.IntegrationError) as info:
        call()
    message = str(info.value)
    assert message.startswith(f"{touchpoint}: "), message
    assert f"{package} {guard.installed_version(package)}" in message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message
