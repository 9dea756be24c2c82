"""In-process CLI runs under ``capsys``: keep logging handlers from holding a closed capture stream.

``hf-gradext train`` configures logging (``logging.basicConfig`` on the root logger) and ``datasets`` /
``transformers`` create their stderr handlers on import. Created inside one test's ``capsys``, such a
handler writes to that test's stream after it is closed, and logging prints "--- Logging error ---" with
a traceback into the next test's stderr. Import the libraries up front, and restore the root handlers after
every test.
"""

from __future__ import annotations

import logging

import datasets  # noqa: F401  (handlers bound to the session's stream, not to one test's capsys)
import pytest
import transformers  # noqa: F401


@pytest.fixture(autouse=True)
def _restore_root_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
