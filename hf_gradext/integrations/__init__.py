"""The one place that touches private transformers / accelerate / peft / datasets APIs.

Everything outside this package uses public APIs only (``Trainer``'s documented overridables such as
``training_step`` / ``compute_loss`` / ``log`` are public). Each module here owns the touchpoints of
one area and checks them once with :func:`hf_gradext.integrations.guard.check_once`; a broken assumption
raises :class:`~hf_gradext.integrations.guard.IntegrationError` naming the touchpoint, the installed
version and the supported range. ``tests/integrations/`` simulates each drift by monkeypatching.
"""

from hf_gradext.integrations.guard import SUPPORTED, IntegrationError, check_once, drift_error

__all__ = ["SUPPORTED", "IntegrationError", "check_once", "drift_error"]
