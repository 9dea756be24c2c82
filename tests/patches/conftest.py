"""Every patch test starts and ends with stock mask creation and no class-level patches."""

from __future__ import annotations

import pytest

from hf_gradext.patches import gpt2_models, mask_cache


@pytest.fixture(autouse=True)
def _clean_patch_state():
    mask_cache.uninstall_mask_cache()
    gpt2_models.uninstall_class_level_patches()
    yield
    mask_cache.uninstall_mask_cache()
    gpt2_models.uninstall_class_level_patches()
