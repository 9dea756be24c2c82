"""SwiGLU feed-forward block for the GPT-2 patch: ``down(silu(gate(x)) * up(x))``.

The three projections are plain bias-free ``nn.Linear`` layers (Llama naming), so the per-sample
gradient engine's Linear rule, peft LoRA (``target_modules=["gate_proj", "up_proj", "down_proj"]``) and
``torch.compile`` all see ordinary modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def default_swiglu_hidden_size(hidden_size: int) -> int:
    """Hidden width that keeps the weight count of GPT-2's GELU MLP (``8 d^2``): ``round(8 d / 3)``.

    ``3 * d * h == 8 * d^2`` exactly when ``d`` is divisible by 3 (GPT-2 small: d=768 -> h=2048);
    otherwise it is off by at most ``d``. The GELU MLP's ``5 d`` bias parameters are not
    carried over (the SwiGLU projections are bias-free).
    """
    return max(1, round(8 * hidden_size / 3))


class GradExtSwiGLUMLP(nn.Module):
    """Drop-in replacement for ``GPT2MLP``: ``(B, T, d) -> (B, T, d)``, dropout on the output as GPT-2."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **factory)  # W1
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **factory)  # W2
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, **factory)  # W3
        # Marks the projection onto the residual stream for GPT-2's depth-scaled init (patches.gpt2_models).
        self.down_proj.gradext_residual_projection = True
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # (B, T, d) -> (B, T, h) twice -> (B, T, d)
        return self.dropout(
            self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))
        )
