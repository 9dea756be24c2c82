"""hf_gradext: a HuggingFace Trainer extension for gradient quality control, per-sample gradients,
Kronecker gradient projection and GPT-2 patches."""

__version__ = "0.1.0"

import hf_gradext.patches  # noqa: E402,F401  (registers model_type gpt2_gradext with the Auto classes)
from hf_gradext.arguments import GradExtArguments  # noqa: E402
from hf_gradext.trainer import GradExtTrainer  # noqa: E402

__all__ = ["GradExtArguments", "GradExtTrainer", "__version__"]
