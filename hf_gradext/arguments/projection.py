"""Projection flags. Filled in by the issue that owns this feature."""

from dataclasses import dataclass


@dataclass
class ProjectionArguments:
    def _validate_projection(self) -> None:
        pass
