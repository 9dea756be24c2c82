"""Model / data / peft flags, named as in transformers' ``run_clm.py`` and TRL's ``ModelConfig``."""

from dataclasses import dataclass


@dataclass
class ModelDataArguments:
    def _validate_model_data(self) -> None:
        pass
