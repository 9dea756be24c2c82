"""Patches flags. Filled in by the issue that owns this feature."""

from dataclasses import dataclass


@dataclass
class PatchesArguments:
    def _validate_patches(self) -> None:
        pass
