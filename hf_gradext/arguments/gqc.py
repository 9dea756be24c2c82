"""GQC (adaptive gradient accumulation) flags. Owned by the GQC issue; filled in there."""

from dataclasses import dataclass


@dataclass
class GQCArguments:
    def _validate_gqc(self) -> None:
        pass
