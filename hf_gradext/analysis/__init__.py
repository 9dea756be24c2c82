"""Analysis of collected gradients, projections and GQC runs (statistics, similarity, plots)."""

from hf_gradext.analysis.gradients import (
    CollectedGradients,
    attention_summary,
    layer_statistics,
    load_gradients,
    norms_over_steps,
    similarity_matrix,
)

__all__ = [
    "CollectedGradients",
    "attention_summary",
    "layer_statistics",
    "load_gradients",
    "norms_over_steps",
    "similarity_matrix",
]
