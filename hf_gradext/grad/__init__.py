"""Per-sample gradient engine: exact per-example gradients, norms and similarities from one backward.

Public API:
    per_sample_gradients, per_sample_grad_norms, gradient_similarity  (one-call functions)
    CaptureEngine            hooks capturing (a, g) per selected layer during one armed backward
    TrainingCaptureObserver  arms a CaptureEngine inside GradExtTrainer's training backward
    LossScale                maps the backwarded loss to sum_i L_i (per-sample mean token losses)
    select_modules           layer selection (groups all|attn|mlp|embed|norm|lora, regexes, comma lists)
    register_layer_math      decorator adding math for a new layer family
    SparseRowGrad            sparse per-sample embedding gradient (.to_dense())
"""

from hf_gradext.grad.api import gradient_similarity, per_sample_grad_norms, per_sample_gradients
from hf_gradext.grad.capture import CaptureEngine
from hf_gradext.grad.loss_scaling import LossScale
from hf_gradext.grad.observer import TrainingCaptureObserver, hf_trainer_loss_scale
from hf_gradext.grad.registry import register_layer_math
from hf_gradext.grad.selection import select_modules
from hf_gradext.grad.sparse import SparseRowGrad

__all__ = [
    "CaptureEngine",
    "LossScale",
    "SparseRowGrad",
    "TrainingCaptureObserver",
    "gradient_similarity",
    "hf_trainer_loss_scale",
    "per_sample_grad_norms",
    "per_sample_gradients",
    "register_layer_math",
    "select_modules",
]
