"""Exceptions whose message is meant to be shown to a user as one line.

The CLI catches :class:`UserFacingError` and prints ``error: <message>`` with exit code 2 instead of a
traceback, so every message must name the problem *and* the fix.
"""


class UserFacingError(ValueError):
    """Bad input or an unusable environment; the message names the problem and the fix."""
