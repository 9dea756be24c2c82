"""Every patch test starts and ends with stock mask creation and no class-level patch defaults."""

from __future__ import annotations

import pytest

from hf_gradext.patches import gpt2_config, mask_cache


@pytest.fixture(autouse=True)
def _clean_patch_state():
    """Every test starts and ends with stock mask creation and no class-level patch defaults."""
    mask_cache.uninstall_mask_cache()
    gpt2_config.set_class_defaults(False, False, None)
    yield
    mask_cache.uninstall_mask_cache()
    gpt2_config.set_class_defaults(False, False, None)
