"""Collection flags. Filled in by the issue that owns this feature."""

from dataclasses import dataclass


@dataclass
class CollectionArguments:
    def _validate_collection(self) -> None:
        pass
