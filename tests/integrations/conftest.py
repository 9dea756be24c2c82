"""Every integration test starts and ends with no touchpoint check remembered as passed."""

from __future__ import annotations

import pytest

from hf_gradext.integrations import guard


@pytest.fixture(autouse=True)
def _fresh_checks():
    guard.reset_checks()
    yield
    guard.reset_checks()
