"""Kronecker (LoRA-style) projection of per-sample gradients; see docs/projection.md.

Public API: :class:`KroneckerProjector`, :func:`load_projections`, :func:`split_rank`,
:func:`make_factors`, :func:`top_k_attribution`, :class:`AdamPreconditioner`.
"""

from hf_gradext.projection.attribution import top_k_attribution
from hf_gradext.projection.io import load_projections, read_metadata
from hf_gradext.projection.matrices import layer_seed, make_factors
from hf_gradext.projection.preconditioning import AdamPreconditioner
from hf_gradext.projection.projector import KroneckerProjector, LayerBlock
from hf_gradext.projection.ranks import split_rank

__all__ = [
    "AdamPreconditioner",
    "KroneckerProjector",
    "LayerBlock",
    "layer_seed",
    "load_projections",
    "make_factors",
    "read_metadata",
    "split_rank",
    "top_k_attribution",
]
